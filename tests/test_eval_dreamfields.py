"""bench/eval_dreamfields.py: the mesh-shape and the mesh-colour checks."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import eval_dreamfields as E  # noqa: E402
import toyworld  # noqa: E402


@pytest.mark.parametrize("shape", toyworld.SHAPES)
def test_each_toy_shape_is_recognised_when_moved_scaled_and_turned(shape):
    g = torch.Generator().manual_seed(toyworld.SHAPES.index(shape))
    pts, _ = toyworld.surface_points(shape, "red", 3000, g)
    yaw, scale = 0.7, 1.3
    c, s = math.cos(yaw), math.sin(yaw)
    pts = torch.stack([pts[:, 0] * c - pts[:, 1] * s, pts[:, 0] * s + pts[:, 1] * c, pts[:, 2]], -1) * scale
    dist = E.shape_distances(pts + torch.tensor([0.2, -0.1, 0.15]), n=800)
    assert set(dist) == set(toyworld.SHAPES) | {"disc"}
    others = sorted(d for k, d in dist.items() if k != shape)
    assert dist[shape] < 0.8 * others[0]                              # the true shape wins clearly


def test_a_torus_without_its_hole_is_the_decoy():
    pts = E.disc_points(3000, torch.Generator().manual_seed(9))
    assert toyworld.sdf_filled_torus(pts).abs().max() < 1e-5                         # the decoy's points lie on its surface
    dist = E.shape_distances(pts * 1.2, n=800)
    assert min(dist, key=dist.get) == "disc" and dist["torus"] > 1.5 * dist["disc"]


def test_nearest_colour_ignores_shading():
    for name, albedo in toyworld.COLOURS.items():
        for shade in (0.3, 0.7, 1.0):
            assert E.nearest_colour(torch.tensor(albedo) * shade) == name
