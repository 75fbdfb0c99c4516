"""Optimizer parameter groups: the groups of every shipped config are pinned (an optimizer state
only resumes into the right parameters when every group keeps its members, their order and its
hyper-parameters), and the rules of the one builder side by side on a tiny model."""

import glob
import json
import os
from functools import partial

import pytest
import torch
import torch.nn as nn
from detectron2.layers.batch_norm import LayerNorm as D2LayerNorm
from param_groups_pinning import FIXTURE, ROOT, SHIPPED_CONFIGS, summarize_config

from convmae_det.engine.optim import get_param_groups
from convmae_det.engine.pretrain_loop import pretrain_param_groups
from convmae_det.engine.seg_solver import get_layer_decay_param_groups
from convmae_det.solver import (
    NO_WEIGHT_DECAY_NAMES,
    NO_WEIGHT_DECAY_OVERRIDES,
    build_param_groups,
    get_convvit_lr_decay_rate,
    is_no_weight_decay,
)

# --------------------------------------------------------------------------- pinned groups


def _pinned():
    with open(FIXTURE) as f:
        return json.load(f)


def _first_difference(got, want):
    if got["optimizer"] != want["optimizer"]:
        return f"optimizer {got['optimizer']} != {want['optimizer']}"
    if len(got["groups"]) != len(want["groups"]):
        return f"{len(got['groups'])} groups, pinned {len(want['groups'])}"
    for i, (g, w) in enumerate(zip(got["groups"], want["groups"])):
        hyper_g = {k: v for k, v in g.items() if k != "params"}
        hyper_w = {k: v for k, v in w.items() if k != "params"}
        if hyper_g != hyper_w:
            return f"group {i}: {hyper_g} != pinned {hyper_w}"
        if g["params"] != w["params"]:
            for j, (a, b) in enumerate(zip(g["params"], w["params"])):
                if a != b:
                    return f"group {i}, parameter {j}: {a} != pinned {b}"
            return f"group {i}: {len(g['params'])} parameters, pinned {len(w['params'])}"
    return None


def test_every_shipped_config_is_pinned():
    shipped = sorted(
        os.path.relpath(p, ROOT)
        for pattern in ("COCO/*.py", "toy/*.py", "ADE20K/*.yaml", "pretrain/*.py", "ImageNet/*.py")
        for p in glob.glob(os.path.join(ROOT, "configs", pattern))
    )
    assert shipped == sorted(SHIPPED_CONFIGS)
    assert sorted(_pinned()) == sorted(SHIPPED_CONFIGS)


@pytest.mark.parametrize("config", SHIPPED_CONFIGS)
def test_groups_of_shipped_config_match_the_pinned_ones(config):
    got = json.loads(json.dumps(summarize_config(config)))  # tuples -> lists, as pinned
    diff = _first_difference(got, _pinned()[config])
    assert diff is None, (
        f"{config}: the optimizer groups changed ({diff}); an existing checkpoint's optimizer "
        "state would resume into the wrong parameters. If intended, regenerate with "
        "`python tests/param_groups_pinning.py` and say so in the change."
    )


# --------------------------------------------------------------------------- the rules


class _Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, dim)
        self.rel_pos_h = nn.Parameter(torch.zeros(7, 2))
        self.gamma_1 = nn.Parameter(torch.ones(dim))


class _Backbone(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, 4, dim))
        self.patch_embed1 = nn.Conv2d(3, dim, 3)
        self.blocks3 = nn.ModuleList([_Block(dim), _Block(dim)])
        self.bn = nn.BatchNorm2d(dim)
        self.ln = D2LayerNorm(dim)


class _Tiny(nn.Module):
    """Names like a detector's: ``backbone.blocks3.i.*`` for the layer decay."""

    def __init__(self, dim=8):
        super().__init__()
        self.backbone = _Backbone(dim)
        self.head = nn.Linear(dim, 2)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.tied = nn.Linear(dim, 2)
        self.tied.weight = self.head.weight  # shared: counted once, under its first name


def _by_name(model, **kw):
    kw.setdefault("with_names", True)
    out = {}
    for group in build_param_groups(model, **kw):
        for name in group["names"]:
            assert name not in out
            out[name] = {k: v for k, v in group.items() if k not in ("params", "names")}
    return out


def _decayed(model, rule):
    g = _by_name(model, weight_decay=0.1, no_decay_rule=rule)
    return {n for n, h in g.items() if h["weight_decay"] == 0.1}, {
        n for n, h in g.items() if h["weight_decay"] == 0.0
    }


def test_norm_rule_decays_biases_but_not_norms():
    decayed, exempt = _decayed(_Tiny(), "norm")
    assert {"backbone.patch_embed1.bias", "backbone.blocks3.0.qkv.bias", "head.bias"} <= decayed
    assert {"backbone.patch_embed1.weight", "head.weight"} <= decayed
    norms = {"backbone.blocks3.0.norm1.weight", "backbone.blocks3.0.norm1.bias"}
    norms |= {"backbone.bn.weight", "backbone.bn.bias", "backbone.ln.weight", "backbone.ln.bias"}
    assert norms <= exempt


def test_ndim_rule_decays_no_bias_and_no_norm():
    decayed, exempt = _decayed(_Tiny(), "ndim")
    assert decayed == {"backbone.patch_embed1.weight", "backbone.blocks3.0.qkv.weight"} | {
        "backbone.blocks3.1.qkv.weight",
        "head.weight",
    }
    assert {"backbone.patch_embed1.bias", "head.bias", "backbone.bn.weight"} <= exempt


@pytest.mark.parametrize("rule", ["norm", "ndim", "none"])
def test_named_tables_are_never_decayed(rule):
    model = nn.Module()
    for name in NO_WEIGHT_DECAY_NAMES:  # 2-D, in no norm layer: only the table exempts them
        setattr(model, name, nn.Parameter(torch.zeros(3, 3)))
    model.proj = nn.Linear(3, 3)
    g = _by_name(model, weight_decay=0.1, no_decay_rule=rule)
    assert all(g[name]["weight_decay"] == 0.0 for name in NO_WEIGHT_DECAY_NAMES)
    assert g["proj.weight"]["weight_decay"] == 0.1
    g = _by_name(model, weight_decay=0.1, no_decay_rule=rule, no_decay_names=())
    assert all(g[name]["weight_decay"] == 0.1 for name in NO_WEIGHT_DECAY_NAMES)


def test_one_no_decay_table_behind_every_public_name():
    assert set(NO_WEIGHT_DECAY_OVERRIDES) == set(NO_WEIGHT_DECAY_NAMES)
    assert all(v == {"weight_decay": 0.0} for v in NO_WEIGHT_DECAY_OVERRIDES.values())
    assert is_no_weight_decay("backbone.blocks3.0.attn.rel_pos_h", 2)
    assert is_no_weight_decay("head.bias", 1)
    assert not is_no_weight_decay("backbone.my_pos_embed", 3)  # own name only, not a suffix


def test_layer_decay_factors_and_lr_scale():
    f = partial(get_convvit_lr_decay_rate, lr_decay_rate=0.5, num_layers=2)
    g = _by_name(
        _Tiny(), base_lr=1.0, weight_decay=0.1, no_decay_rule="ndim", lr_factor_func=f,
        with_lr_scale=True,
    )  # fmt: skip
    assert g["backbone.patch_embed1.weight"]["lr_scale"] == 0.5**3
    assert g["backbone.pos_embed"]["lr"] == 0.5**3
    assert g["backbone.blocks3.0.qkv.weight"]["lr"] == 0.5**2
    assert g["backbone.blocks3.1.qkv.weight"]["lr"] == 0.5
    assert g["head.weight"] == {"lr": 1.0, "weight_decay": 0.1, "lr_scale": 1.0}


def test_frozen_parameters_are_skipped_and_shared_ones_counted_once():
    model = _Tiny()
    groups = build_param_groups(model, weight_decay=0.1, no_decay_rule="norm", with_names=True)
    names = [n for g in groups for n in g["names"]]
    params = [p for g in groups for p in g["params"]]
    assert not any(n.startswith("frozen.") for n in names)
    assert "head.weight" in names and "tied.weight" not in names
    assert len({id(p) for p in params}) == len(params)
    order = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(order)
    for g in groups:  # in each group, the order of model.named_parameters()
        assert g["names"] == sorted(g["names"], key=order.index)


def test_groups_follow_first_appearance_and_overrides_come_last():
    groups = build_param_groups(
        _Tiny(), base_lr=1.0, weight_decay=0.1, no_decay_rule="norm",
        overrides={"bias": {"weight_decay": 0.5}, "gamma_1": {"lr": 2.0}},
    )  # fmt: skip
    assert [(g["lr"], g["weight_decay"]) for g in groups] == [
        (1.0, 0.0),  # pos_embed
        (1.0, 0.1),  # patch_embed1.weight
        (1.0, 0.5),  # patch_embed1.bias (and the norm biases: overrides win)
        (2.0, 0.0),  # gamma_1
    ]


def test_no_decay_first_gives_mae_order_even_without_weight_decay():
    model = _Tiny()
    for wd in (0.05, 0.0):
        no_decay, decay = build_param_groups(
            model, weight_decay=wd, no_decay_rule="ndim", no_decay_names=(), no_decay_first=True
        )
        assert no_decay == {"weight_decay": 0.0, "params": no_decay["params"]}
        assert all(p.ndim <= 1 for p in no_decay["params"])
        assert decay["weight_decay"] == wd and all(p.ndim > 1 for p in decay["params"])


def test_no_trainable_parameters_is_a_clear_error():
    model = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no trainable parameters"):
        build_param_groups(model, weight_decay=0.1, no_decay_rule="norm")
    with pytest.raises(ValueError, match="has no parameters"):
        build_param_groups(nn.ReLU(), weight_decay=0.1, no_decay_rule="ndim")


def test_unknown_rule_and_lr_factor_without_base_lr_are_refused():
    with pytest.raises(ValueError, match="no_decay_rule='bias'"):
        build_param_groups(_Tiny(), weight_decay=0.1, no_decay_rule="bias")
    with pytest.raises(ValueError, match="need base_lr"):
        build_param_groups(_Tiny(), weight_decay=0.1, no_decay_rule="ndim", lr_factor_func=abs)


def test_recipes_state_their_rules():
    model = _Tiny()
    det = get_param_groups(model, base_lr=1.0, weight_decay=0.1)
    wd = {id(p): g["weight_decay"] for g in det for p in g["params"]}
    assert wd[id(model.head.bias)] == 0.1 and wd[id(model.backbone.bn.bias)] == 0.0
    assert wd[id(model.backbone.pos_embed)] == 0.0
    det = get_param_groups(model, base_lr=1.0, weight_decay=0.1, weight_decay_norm=None)
    assert {id(p): g["weight_decay"] for g in det for p in g["params"]}[id(model.backbone.bn.bias)]

    seg = get_layer_decay_param_groups(
        model, base_lr=1.0, weight_decay=0.1, layer_decay=0.5, num_layers=2
    )
    assert all({"lr_scale", "names"} <= set(g) for g in seg)
    assert {n for g in seg if g["weight_decay"] for n in g["names"]} == {
        "backbone.patch_embed1.weight",
        "backbone.blocks3.0.qkv.weight",
        "backbone.blocks3.1.qkv.weight",
        "head.weight",
    }

    no_decay, decay = pretrain_param_groups(model, 0.05)
    assert any(p is model.backbone.pos_embed for p in decay["params"])  # MAE: no named tables
    assert any(p is model.head.bias for p in no_decay["params"])
