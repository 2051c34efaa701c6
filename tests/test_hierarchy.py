import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from schce.hierarchy import Hierarchy, HierarchyCycleError, validate_reachability
from schce.ontology import load_cell_ontology

FIXTURE = Path(__file__).parent / "data" / "cl_subset.obo"

# The example of the HCE paper: A is the root, B and C its children, D under B, E under both B and C.
HCE_EDGES = [("A", "B"), ("A", "C"), ("B", "D"), ("B", "E"), ("C", "E")]
HCE_R = np.array(
    [
        [1, 1, 1, 1, 1],
        [0, 1, 0, 1, 1],
        [0, 0, 1, 0, 1],
        [0, 0, 0, 1, 0],
        [0, 0, 0, 0, 1],
    ]
)

CD4 = "CL:0000624"
CD8 = "CL:0000625"
NAIVE_CD8 = "CL:0000900"
CD14_MONO = "CL:0001054"
CD16_MONO = "CL:0002396"
B_CELL = "CL:0000236"
T_CELL = "CL:0000084"
ROOT = "CL:0000000"
CL_LABELS = [CD4, CD8, NAIVE_CD8, CD14_MONO, CD16_MONO, B_CELL]


@pytest.fixture
def hce() -> Hierarchy:
    return Hierarchy.from_edges(HCE_EDGES)


@pytest.fixture(scope="module")
def onto():
    return load_cell_ontology(FIXTURE)


@pytest.fixture(scope="module")
def cl_hierarchy(onto) -> Hierarchy:
    return Hierarchy.from_ontology(CL_LABELS, onto)


# ---------------------------------------------------------------------- reachability


def test_hce_example_reachability(hce):
    assert hce.labels == ("A", "B", "C", "D", "E")
    assert hce.terms == hce.labels
    assert hce.n_labels == 5
    assert np.array_equal(hce.R, HCE_R)
    assert np.array_equal(hce.term_matrix, HCE_R)


def test_reachability_tensor(hce):
    t = hce.reachability()
    assert isinstance(t, torch.Tensor)
    assert t.dtype == torch.float32
    assert t.dtype == torch.float32 and (t == torch.tensor(HCE_R, dtype=torch.float32)).all()
    assert hce.reachability(dtype=torch.float64).dtype == torch.float64


def test_reachability_is_a_partial_order(hce):
    R = hce.R.astype(bool)
    assert R.diagonal().all()  # reflexive
    assert np.array_equal(R & R.T, np.eye(5, dtype=bool))  # antisymmetric
    closure = (R.astype(int) @ R.astype(int)) > 0
    assert not (closure & ~R).any()  # transitive
    validate_reachability(hce.R)  # does not raise


def test_labels_order_permutes_R():
    order = ["E", "D", "C", "B", "A"]
    h = Hierarchy.from_edges(HCE_EDGES, labels=order)
    assert h.labels == tuple(order)
    assert np.array_equal(h.R, HCE_R[::-1, ::-1])
    perm = [2, 0, 4, 1, 3]  # C, A, E, B, D
    h2 = Hierarchy.from_edges(HCE_EDGES, labels=["ABCDE"[k] for k in perm])
    assert h2.labels == ("C", "A", "E", "B", "D")
    assert np.array_equal(h2.R, HCE_R[np.ix_(perm, perm)])


def test_ancestor_terms_follow_labels():
    h = Hierarchy.from_edges(HCE_EDGES, labels=["D", "E"])
    assert h.labels == ("D", "E")
    assert h.terms == ("D", "E", "A", "B", "C")
    assert np.array_equal(h.R, np.eye(2))
    rows = {t: h.term_matrix[i].astype(int).tolist() for i, t in enumerate(h.terms)}
    assert rows == {"D": [1, 0], "E": [0, 1], "A": [1, 1], "B": [1, 1], "C": [0, 1]}
    assert h.term_matrix.shape == (5, 2)


def test_terms_outside_the_labels_ancestry_are_dropped():
    h = Hierarchy.from_edges(HCE_EDGES, labels=["C"])
    assert h.terms == ("C", "A")
    assert set(h.edges()) == {("A", "C")}


# ---------------------------------------------------------------------- structure queries


def test_ancestors_descendants(hce):
    assert hce.ancestors("E") == {"A", "B", "C"}
    assert hce.ancestors("E", include_self=True) == {"A", "B", "C", "E"}
    assert hce.ancestors("D") == {"A", "B"}
    assert hce.ancestors("A") == set()
    assert hce.ancestors("A", include_self=True) == {"A"}
    assert hce.descendants("A") == {"B", "C", "D", "E"}
    assert hce.descendants("B") == {"D", "E"}
    assert hce.descendants("C") == {"E"}
    assert hce.descendants("C", include_self=True) == {"C", "E"}
    assert hce.descendants("D") == set()


def test_parents_and_edges(hce):
    assert hce.parents("A") == ()
    assert hce.parents("B") == ("A",)
    assert hce.parents("E") == ("B", "C")
    edges = hce.edges()
    assert len(edges) == 5
    assert set(edges) == set(HCE_EDGES)


def test_depth_is_longest_path_from_root(hce):
    assert hce.depth.tolist() == [0, 1, 1, 2, 2]
    # A -> C directly and A -> B -> C: the longest path counts.
    h = Hierarchy.from_edges([("A", "B"), ("B", "C"), ("A", "C")])
    assert h.depth.tolist() == [0, 1, 2]


def test_label_index(hce):
    idx = hce.label_index(["E", "A", "zzz", "C"])
    assert idx.dtype == np.int64
    assert idx.tolist() == [4, 0, -1, 2]
    h = Hierarchy.from_edges(HCE_EDGES, labels=["D", "E"])
    # Ancestor terms are terms of the hierarchy but not labels.
    assert h.label_index(["E", "D", "A", "B", "C", "nope"]).tolist() == [1, 0, -1, -1, -1, -1]


def test_names_default_to_terms():
    h = Hierarchy.from_edges(HCE_EDGES, names={"A": "root", "E": "leaf"})
    assert h.name("A") == "root"
    assert h.name("B") == "B"
    assert h.names() == ["root", "B", "C", "D", "leaf"]
    assert h.names(["E", "C"]) == ["leaf", "C"]


# ---------------------------------------------------------------------- validation


CYCLE_ROTATIONS = ("A -> B -> C -> A", "B -> C -> A -> B", "C -> A -> B -> C")


@pytest.mark.parametrize(
    "edges",
    [
        [("A", "B"), ("B", "C"), ("C", "A")],
        [("C", "A"), ("B", "C"), ("A", "B")],
        [("R", "A"), ("A", "B"), ("B", "C"), ("C", "A"), ("R", "D")],
    ],
)
def test_cycle_is_named(edges):
    with pytest.raises(HierarchyCycleError) as info:
        Hierarchy.from_edges(edges)
    message = str(info.value)
    assert any(rot in message for rot in CYCLE_ROTATIONS), message


def test_two_cycle_and_self_loop():
    with pytest.raises(HierarchyCycleError) as info:
        Hierarchy.from_edges([("A", "B"), ("B", "A")])
    assert "A -> B -> A" in str(info.value) or "B -> A -> B" in str(info.value)
    with pytest.raises(HierarchyCycleError, match="A -> A"):
        Hierarchy.from_edges([("R", "A"), ("A", "A")])


def test_cycle_error_is_value_error():
    assert issubclass(HierarchyCycleError, ValueError)


@pytest.mark.parametrize(
    ("R", "match"),
    [
        (np.ones((2, 3)), "square"),
        (np.ones(3), "square"),
        (np.array([[1, 0], [0, 0]]), "reflexive"),
        (np.array([[1, 1], [1, 1]]), "antisymmetric"),
        (np.array([[1, 1, 0], [0, 1, 1], [0, 0, 1]]), "transitive"),
    ],
)
def test_validate_reachability_rejects(R, match):
    with pytest.raises(ValueError, match=match):
        validate_reachability(R)


def test_validate_reachability_accepts_partial_orders():
    validate_reachability(np.eye(3))
    validate_reachability(np.array([[1, 1, 1], [0, 1, 1], [0, 0, 1]]))


def test_duplicate_and_empty_labels():
    with pytest.raises(ValueError, match="'A'"):
        Hierarchy(["A", "B", "A"], [("A", "B")])
    with pytest.raises(ValueError):
        Hierarchy([], [("A", "B")])
    with pytest.raises(ValueError):
        Hierarchy.from_edges(HCE_EDGES, labels=[])


# ---------------------------------------------------------------------- correctness rule


def test_is_correct_sctab_rule(hce):
    true = ["B", "B", "B", "C", "B", "D", "B", "B", "D", "A"]
    pred = ["B", "D", "E", "E", "A", "E", "C", "zzz", "B", "E"]
    # exact, child, child, child (via C), ancestor, sibling, sibling, unknown, ancestor, grandchild
    expected = [True, True, True, True, False, False, False, False, False, True]
    out = hce.is_correct(pred, true)
    assert out.dtype == bool
    assert out.tolist() == expected


def test_is_correct_true_outside_hierarchy(hce):
    assert hce.is_correct(["X", "A", "E"], ["X", "X", "X"]).tolist() == [True, False, False]


def test_is_correct_with_non_label_true_term():
    h = Hierarchy.from_edges(HCE_EDGES, labels=["D", "E"])
    # B and C are ancestor terms only; their descendant labels are correct for them.
    assert h.is_correct(["D", "E", "D", "E"], ["B", "B", "C", "C"]).tolist() == [True, True, False, True]


def test_is_correct_length_mismatch(hce):
    with pytest.raises(ValueError, match="length"):
        hce.is_correct(["A", "B"], ["A"])
    with pytest.raises(ValueError):
        hce.correct_predictions(["A"], ["A", "B"])


def test_correct_predictions(hce):
    out = hce.correct_predictions(["D", "A", "D", "E", "E", "C"], ["B", "B", "D", "C", "E", "B"])
    assert out.tolist() == ["B", "A", "D", "C", "E", "C"]


# ---------------------------------------------------------------------- subtree scores and coarse terms


def test_subtree_scores(hce):
    p = np.array([[0.1, 0.2, 0.3, 0.15, 0.25], [0.0, 0.0, 0.0, 0.0, 1.0]])
    s = hce.subtree_scores(p)
    assert s.shape == (2, 5)
    np.testing.assert_allclose(s[0], [1.0, 0.6, 0.55, 0.15, 0.25])
    np.testing.assert_allclose(s[1], [1.0, 1.0, 1.0, 0.0, 1.0])


def test_subtree_scores_ancestor_terms():
    h = Hierarchy.from_edges(HCE_EDGES, labels=["D", "E"])
    s = h.subtree_scores(np.array([[0.3, 0.7]]))
    # terms D, E, A, B, C
    np.testing.assert_allclose(s[0], [0.3, 0.7, 1.0, 1.0, 0.7])


def test_coarse_terms(hce):
    p = np.array(
        [
            [0.1, 0.2, 0.3, 0.15, 0.25],  # A 1, B .6, C .55, D .15, E .25 -> B (depth 1, beats C on score)
            [0.0, 0.05, 0.05, 0.6, 0.3],  # A 1, B .95, C .35, D .6, E .3 -> D (deepest)
            [0.0, 0.1, 0.5, 0.1, 0.3],  # A 1, B .5, C .8, D .1, E .3 -> C (ties B on depth, higher score)
            [0.6, 0.1, 0.1, 0.1, 0.1],  # A 1, B .3, C .2, D .1, E .1 -> A (only the root qualifies)
            [0.0, 0.0, 0.0, 0.45, 0.55],  # A 1, B 1, C .55, D .45, E .55 -> E
        ]
    )
    s = hce.subtree_scores(p)
    assert [hce.terms[i] for i in hce.coarse_terms(s, 0.5)] == ["B", "D", "C", "A", "E"]
    # Lower threshold: D and E both reach it in the last row; E has the higher score.
    assert hce.terms[hce.coarse_terms(s[4:], 0.3)[0]] == "E"
    # Threshold 1: only full subtrees qualify.
    assert [hce.terms[i] for i in hce.coarse_terms(s, 1.0)] == ["A", "A", "A", "A", "B"]


def test_coarse_terms_inclusive_threshold(hce):
    s = hce.subtree_scores(np.array([[0.3, 0.1, 0.1, 0.1, 0.4]]))  # A 1, B .6, C .5, D .1, E .4
    assert hce.terms[hce.coarse_terms(s, 0.6)[0]] == "B"  # B exactly at the threshold
    assert hce.terms[hce.coarse_terms(s, 0.5)[0]] == "B"  # B and C qualify at depth 1; B scores higher
    assert hce.terms[hce.coarse_terms(s, 0.61)[0]] == "A"
    s = hce.subtree_scores(np.array([[0.45, 0.0, 0.1, 0.05, 0.4]]))  # A 1, B .45, C .5, D .05, E .4
    assert hce.terms[hce.coarse_terms(s, 0.5)[0]] == "C"  # C exactly at the threshold


def test_coarse_terms_no_qualifying_term_gets_best_score(hce):
    scores = np.array([[0.2, 0.4, 0.3, 0.1, 0.0]])
    assert hce.coarse_terms(scores, 0.5).tolist() == [1]


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.0001, 2.0, math.nan])
def test_coarse_terms_threshold_validation(hce, threshold):
    s = hce.subtree_scores(np.full((1, 5), 0.2))
    with pytest.raises(ValueError, match="threshold"):
        hce.coarse_terms(s, threshold)


# ---------------------------------------------------------------------- Cell Ontology


def test_from_ontology_reachability(cl_hierarchy):
    h = cl_hierarchy
    assert h.labels == tuple(CL_LABELS)
    i = {label: k for k, label in enumerate(CL_LABELS)}
    assert h.R[i[CD8], i[NAIVE_CD8]] == 1
    assert h.R[i[NAIVE_CD8], i[CD8]] == 0
    assert h.R[i[CD14_MONO], i[CD16_MONO]] == 1
    assert h.R[i[CD4], i[CD8]] == 0
    assert h.R[i[CD4], i[NAIVE_CD8]] == 0
    assert h.R[i[B_CELL]].sum() == 1
    assert int(h.R.sum()) == len(CL_LABELS) + 2


def test_from_ontology_matches_ontology_closure(cl_hierarchy, onto):
    h = cl_hierarchy
    for a, la in enumerate(CL_LABELS):
        for b, lb in enumerate(CL_LABELS):
            assert h.R[a, b] == (lb in onto.descendants(la, include_self=True)), (la, lb)
    expected_terms = set(CL_LABELS).union(*(onto.ancestors(label) for label in CL_LABELS))
    assert set(h.terms) == expected_terms
    assert h.terms[: len(CL_LABELS)] == tuple(CL_LABELS)
    assert h.ancestors(NAIVE_CD8) == onto.ancestors(NAIVE_CD8)


def test_from_ontology_terms_names_version(cl_hierarchy, onto):
    h = cl_hierarchy
    assert T_CELL in h.terms
    assert ROOT in h.terms
    assert h.label_index([T_CELL, ROOT, CD8]).tolist() == [-1, -1, 1]
    assert h.name(T_CELL) == "T cell"
    assert h.name(ROOT) == "cell"
    assert h.name(B_CELL) == "B cell"
    assert h.version == onto.version == "2026-03-26"
    assert h.depth[h.terms.index(ROOT)] == 0
    # T cell's subtree covers exactly the three T cell labels.
    assert h.term_matrix[h.terms.index(T_CELL)].astype(int).tolist() == [1, 1, 1, 0, 0, 0]
    assert h.term_matrix[h.terms.index(ROOT)].all()
    assert h.is_correct([NAIVE_CD8, CD8, CD16_MONO], [CD8, NAIVE_CD8, T_CELL]).tolist() == [True, False, False]


@pytest.mark.parametrize("bad", ["CL:9999999", "CL:0000002"])  # unknown; obsolete
def test_from_ontology_unknown_label(onto, bad):
    with pytest.raises(ValueError, match=bad):
        Hierarchy.from_ontology([CD4, bad], onto)


# ---------------------------------------------------------------------- persistence


@pytest.mark.parametrize("which", ["hce", "hce_subset", "cl"])
def test_dict_round_trip(which, cl_hierarchy):
    if which == "hce":
        h = Hierarchy.from_edges(HCE_EDGES, names={"A": "root"})
    elif which == "hce_subset":
        h = Hierarchy.from_edges(HCE_EDGES, labels=["E", "D"])
    else:
        h = cl_hierarchy
    d = json.loads(json.dumps(h.to_dict()))
    h2 = Hierarchy.from_dict(d)
    assert h2.labels == h.labels
    assert h2.terms == h.terms
    assert np.array_equal(h2.R, h.R)
    assert np.array_equal(h2.term_matrix, h.term_matrix)
    assert h2.names(h2.terms) == h.names(h.terms)
    assert h2.version == h.version
    assert set(h2.edges()) == set(h.edges())


def test_to_dict_content():
    d = Hierarchy.from_edges(HCE_EDGES, names={"A": "root"}).to_dict()
    assert d["labels"] == ["A", "B", "C", "D", "E"]
    assert sorted(map(tuple, d["edges"])) == sorted(HCE_EDGES)
    assert d["names"] == {"A": "root", "B": "B", "C": "C", "D": "D", "E": "E"}
    assert d["version"] == "unknown"


def _accepted(h: Hierarchy, masks, rows, i):
    return {h.labels[j] for j in np.flatnonzero(masks[rows[i]])}


def test_annotation_targets_auto_follows_each_source(hce):
    # Source x uses A, B and D; source y uses A and C (the A–E example: E is below both B and C).
    codes = hce.label_index(["A", "B", "D", "A", "C"])
    sources = np.array(["x", "x", "x", "y", "y"])
    masks, rows = hce.annotation_targets(codes, sources)
    assert masks.dtype == bool and rows.dtype == np.int64 and len(rows) == 5
    assert _accepted(hce, masks, rows, 0) == {"A", "C"}  # A less B's subtree {B, D, E}
    assert _accepted(hce, masks, rows, 1) == {"B", "E"}  # B less D
    assert _accepted(hce, masks, rows, 2) == {"D"}
    assert _accepted(hce, masks, rows, 3) == {"A", "B", "D"}  # A less C's subtree {C, E}
    assert _accepted(hce, masks, rows, 4) == {"C", "E"}  # y uses nothing below C
    # Distinct sets only: five different sets here, and every row holds its own label.
    assert len(masks) == 5
    assert all(masks[rows[i], codes[i]] for i in range(5))


def test_annotation_targets_one_source_and_forced_readings(hce):
    codes = hce.label_index(["A", "C", "C", "E"])
    masks, rows = hce.annotation_targets(codes)
    assert _accepted(hce, masks, rows, 0) == {"A", "B", "D"}
    assert _accepted(hce, masks, rows, 1) == {"C"}
    assert rows[1] == rows[2]
    inclusive, rows_in = hce.annotation_targets(codes, semantics="inclusive")
    np.testing.assert_array_equal(inclusive[rows_in], hce.R[codes])
    exclusive, rows_ex = hce.annotation_targets(codes, semantics="exclusive")
    np.testing.assert_array_equal(exclusive[rows_ex], np.eye(5, dtype=bool)[codes])
    with pytest.raises(ValueError, match="semantics must be one of"):
        hce.annotation_targets(codes, semantics="fine")
    with pytest.raises(ValueError, match="codes must index"):
        hce.annotation_targets(np.array([0, 7]))
    with pytest.raises(ValueError, match="differ in length"):
        hce.annotation_targets(codes, np.array(["x"]))


def test_annotation_targets_on_the_cell_ontology(cl_hierarchy):
    # A source that says both CD14 and CD16 monocyte means "CD14, not CD16"; one that only says CD14 may mean CD16.
    h = cl_hierarchy
    assert h.R[h.labels.index(CD14_MONO), h.labels.index(CD16_MONO)]  # CD16 monocyte is_a CD14 monocyte
    codes = h.label_index([CD14_MONO, CD16_MONO, CD14_MONO])
    masks, rows = h.annotation_targets(codes, np.array(["both", "both", "one"]))
    i16 = h.labels.index(CD16_MONO)
    assert not masks[rows[0], i16]
    assert masks[rows[2], i16]
