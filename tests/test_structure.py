"""Flattening module values into site leaves and rebuilding them."""

from __future__ import annotations

from collections import namedtuple

import torch
from transformers.modeling_outputs import CausalLMOutput

from fxpatch.structure import flatten, unflatten


def test_round_trip_keeps_types_and_keys():
    t = torch.zeros(1)
    value = ((t, None), {"mask": t, "flag": True})
    leaves, spec = flatten(value)
    assert [k for k, _ in leaves] == ["[0][0]", "[0][1]", "[1]['mask']", "[1]['flag']"]
    assert unflatten(spec, [v for _, v in leaves]) == ((t, None), {"mask": t, "flag": True})
    out = CausalLMOutput(logits=t)
    leaves, spec = flatten(out)
    assert [k for k, _ in leaves] == ["['logits']"]
    rebuilt = unflatten(spec, [t])
    assert isinstance(rebuilt, CausalLMOutput) and rebuilt.logits is t


def test_named_tuples_and_objects_are_leaves():
    Point = namedtuple("Point", "x y")
    leaves, spec = flatten([Point(1, 2), object])
    assert [v for _, v in leaves] == [Point(1, 2), object] and spec.num_leaves == 2
