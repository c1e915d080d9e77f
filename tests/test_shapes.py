"""The tetris shapes and the shape classifier: the shapes are what the book says they are (eight
distinct shapes, one mirror pair), and the classifier's scores do not change under rotations,
translations and permutations of the points, but do under a mirror, when they can."""

import functools
import itertools
import warnings

import pytest
import torch
from e3nn import o3

from se3tutor.checks import default_dtype
from se3tutor.shapes import SHAPE_NAMES, ShapeClassifier, tetris
from se3tutor.transformer import hidden_irreps

MAX_RADIUS = 3.5  # larger than every shape: complete graphs
TOLERANCE_FLOAT64 = 1e-9  # scores of order 1 (tests/conftest.py)
RIGHT, LEFT = SHAPE_NAMES.index("screw (right)"), SHAPE_NAMES.index("screw (left)")


pytestmark = pytest.mark.usefixtures("one_thread")  # graphs of a few dozen points


def congruent(a: torch.Tensor, b: torch.Tensor, reflections: bool = False) -> bool:
    """Whether some rotation (or, with ``reflections``, rotation or reflection) about the
    centroids maps the point set ``a [n, 3]`` onto ``b [n, 3]``, in some order of the points.

    For each order of ``b``, the orthogonal matrix that fits ``a`` to it best in the least
    squares sense (Kabsch) is ``V diag(1, 1, d) U^T`` from the SVD ``a^T b = U S V^T``, with
    ``d = 1`` for any orthogonal matrix and ``d = det(V U^T)`` for a rotation.
    """
    a, b = a - a.mean(dim=0), b - b.mean(dim=0)
    for order in itertools.permutations(range(len(b))):
        target = b[list(order)]
        u, _, vt = torch.linalg.svd(a.T @ target)
        d = 1.0 if reflections else torch.linalg.det(vt.T @ u.T).sign().item()
        fit = vt.T @ torch.diag(a.new_tensor([1.0, 1.0, d])) @ u.T
        if torch.allclose(a @ fit.T, target, atol=1e-9):
            return True
    return False


def shapes(dtype=torch.float64):
    pos, labels, batch = tetris(dtype)
    return list(pos.view(len(labels), -1, 3))


def mirror(points: torch.Tensor) -> torch.Tensor:
    return points * points.new_tensor([1.0, 1.0, -1.0])


@functools.cache
def build_classifier(symmetry: str, num_layers: int = 3) -> ShapeClassifier:
    """Untrained, float64; built once per configuration (tests must not modify it)."""
    torch.manual_seed(0)
    with default_dtype(torch.float64):
        return ShapeClassifier(
            len(SHAPE_NAMES),
            hidden_irreps(4, 1, symmetry),
            max_radius=MAX_RADIUS,
            num_layers=num_layers,
        )


def test_tetris_gives_eight_centred_shapes_of_four_face_joined_cubes():
    pos, labels, batch = tetris()
    assert pos.shape == (32, 3) and pos.dtype == torch.float32
    assert labels.tolist() == list(range(8)) and len(SHAPE_NAMES) == 8
    assert batch.tolist() == [s for s in range(8) for _ in range(4)]
    for points in shapes():
        assert points.mean(dim=0).abs().max() == 0  # centred, exactly (quarters of integers)
        corner = points - points.min(dim=0).values
        assert torch.equal(corner, corner.round())  # cube centres on the integer lattice
        distances = torch.cdist(points, points)
        assert (distances + torch.eye(4, dtype=points.dtype) > 0.5).all()  # four distinct cubes
        joined = (distances - 1).abs() < 1e-12  # face to face
        reached = torch.linalg.matrix_power(joined.double() + torch.eye(4).double(), 3)
        assert (reached > 0).all()  # connected


def test_tetris_rejects_an_integer_dtype():
    with pytest.raises(TypeError, match="floating-point"):
        tetris(torch.int64)


def test_congruence_check_finds_a_rotated_reordered_copy_and_a_mirror_image():
    points = shapes()[SHAPE_NAMES.index("zigzag")]
    moved = (points @ o3.rand_matrix(dtype=points.dtype).T)[torch.tensor([2, 0, 3, 1])]
    assert congruent(points, moved)
    right = shapes()[RIGHT]
    assert congruent(right, mirror(right), reflections=True)
    assert not congruent(right, mirror(right))


def test_no_rotation_turns_one_shape_into_another():
    for (i, a), (j, b) in itertools.combinations(enumerate(shapes()), 2):
        assert not congruent(a, b), (SHAPE_NAMES[i], SHAPE_NAMES[j])


def test_the_screws_are_each_others_mirror_image_and_every_other_shape_is_its_own():
    all_shapes = shapes()
    assert congruent(mirror(all_shapes[RIGHT]), all_shapes[LEFT])
    for name, points in zip(SHAPE_NAMES, all_shapes):
        assert congruent(points, mirror(points)) == (name not in ("screw (right)", "screw (left)"))


@pytest.mark.parametrize("symmetry", ["E3", "SE3"])
def test_scores_are_invariant_under_rotations_translations_and_permutations(symmetry):
    model = build_classifier(symmetry)
    pos, labels, batch = tetris(torch.float64)
    with torch.no_grad():
        scores = model(pos, batch)
        for _ in range(3):
            rotation = o3.rand_matrix(dtype=torch.float64)
            shift = 10 * torch.randn(len(labels), 3, dtype=torch.float64)[batch]  # one per shape
            order = torch.randperm(len(pos))
            moved = (pos @ rotation.T + shift)[order]
            error = (model(moved, batch[order]) - scores).abs().max()
            assert error < TOLERANCE_FLOAT64


def test_with_natural_parities_a_mirror_image_gets_the_same_scores():
    model = build_classifier("E3")
    pos, labels, batch = tetris(torch.float64)
    with torch.no_grad():
        scalars, pseudoscalars = model.invariants(pos, batch)
        scores = model(pos, batch)
    assert not model.reads_pseudoscalars and pseudoscalars.abs().max() == 0
    assert scalars.abs().max() > 1e-3
    assert (scores[RIGHT] - scores[LEFT]).abs().max() < TOLERANCE_FLOAT64


def test_with_both_parities_the_scores_of_the_screws_differ_by_their_pseudoscalars():
    model = build_classifier("SE3")
    pos, labels, batch = tetris(torch.float64)
    with torch.no_grad():
        scalars, pseudoscalars = model.invariants(pos, batch)
    assert (scalars[RIGHT] - scalars[LEFT]).abs().max() < TOLERANCE_FLOAT64
    assert (pseudoscalars[RIGHT] + pseudoscalars[LEFT]).abs().max() < TOLERANCE_FLOAT64
    assert pseudoscalars[RIGHT].abs().max() > 1e-3
    achiral = [s for s in range(8) if s not in (RIGHT, LEFT)]
    assert pseudoscalars[achiral].abs().max() < TOLERANCE_FLOAT64  # own mirror image: p = -p


def test_two_layers_cannot_make_a_pseudoscalar():
    model = build_classifier("SE3", num_layers=2)
    pos, labels, batch = tetris(torch.float64)
    with torch.no_grad():
        _, pseudoscalars = model.invariants(pos, batch)
    assert pseudoscalars.abs().max() == 0


@pytest.mark.slow
def test_trained_on_one_orientation_the_classifier_recognises_every_rotation():
    torch.manual_seed(0)
    model = ShapeClassifier(8, hidden_irreps(4, 1, "SE3"), max_radius=MAX_RADIUS)
    pos, labels, batch = tetris()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(pos, batch), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rotations = o3.rand_matrix(20)  # [20, 3, 3]
    rotated = torch.einsum("rij,nj->rni", rotations, pos).reshape(-1, 3)
    copies = (8 * torch.arange(20)[:, None] + batch).reshape(-1)  # copy r of shape s: 8 r + s
    with torch.no_grad():
        predicted = model(rotated, copies).argmax(dim=1)
    assert torch.equal(predicted, labels.repeat(20))


@pytest.mark.parametrize("symmetry", ["E3", "SE3"])
def test_building_a_classifier_warns_about_nothing(symmetry):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ShapeClassifier(8, hidden_irreps(4, 1, symmetry), max_radius=MAX_RADIUS)
    # e.g. SE3Transformer's warning about outputs that the hidden irreps cannot reach
    assert [str(warning.message) for warning in caught] == []


def test_classifier_rejects_bad_input():
    model = build_classifier("SE3")
    pos, labels, batch = tetris(torch.float64)
    with pytest.raises(TypeError, match="pos"):
        model(pos.tolist(), batch)
    with pytest.raises(ValueError, match="pos"):
        model(pos[:, :2], batch)
    with pytest.raises(ValueError, match="batch"):
        model(pos, batch[:-1])
    with pytest.raises(TypeError, match="batch"):
        model(pos, batch.double())
    with pytest.raises(TypeError, match="float64"):
        model(pos.float(), batch)
    with pytest.raises(ValueError, match="num_classes"):
        ShapeClassifier(0, "4x0e", max_radius=MAX_RADIUS)


def test_num_shapes_sets_the_number_of_rows_and_gaps_get_zeros():
    model = build_classifier("SE3")
    pos, labels, batch = tetris(torch.float64)
    with torch.no_grad():
        scores = model(pos, batch)
        assert torch.equal(model(pos, batch, num_shapes=len(labels)), scores)
        # Shape ids 0, 2, ..., 14: without num_shapes the last row would be shape 14's.
        spread = model(pos, 2 * batch, num_shapes=17)
        scalars, pseudoscalars = model.invariants(pos, 2 * batch, num_shapes=17)
        alone = model(pos[:4], num_shapes=1)
    assert spread.shape == scalars.shape == pseudoscalars.shape == (17, 8)
    assert (spread[::2][:8] - scores).abs().max() < TOLERANCE_FLOAT64
    assert spread[1::2].abs().max() == 0 and spread[16].abs().max() == 0
    assert (alone - scores[:1]).abs().max() < TOLERANCE_FLOAT64


def test_num_shapes_must_be_a_positive_int_and_one_without_batch():
    model = build_classifier("SE3")
    pos, labels, batch = tetris(torch.float64)
    for wrong in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="num_shapes"):
            model(pos, batch, num_shapes=wrong)
    with pytest.raises(ValueError, match="without batch"):
        model.invariants(pos[:4], num_shapes=2)
