"""YAML config files never run code.

detectron2's ``CfgNode.merge_from_file`` defaults to ``allow_unsafe=True`` (fvcore then retries an
unknown tag with ``yaml.unsafe_load``) and ``LazyConfig.load`` reads a ``.yaml`` with
``yaml.unsafe_load``, so ``!!python/object/apply:os.system [...]`` in a config, in one of its
``_BASE_`` files or in a shared ``output/config.yaml`` used to run. These tests put such payloads
(each of which creates a marker file when it runs) in every place a config is read, through the
library and through every tool, and check that the file is refused with one line naming the file
and the tag, and that the marker never appears. A ``.yaml`` LazyConfig may also not name arbitrary
callables (``_target_``, ``!!python/name``) or call OmegaConf resolvers that build config nodes:
both run code when the config is instantiated. Shipped and saved configs load as before.
"""

from __future__ import annotations

import functools
import glob
import os
import subprocess
import sys
import uuid
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import yaml
from detectron2.config import LazyConfig, get_cfg, instantiate
from omegaconf import DictConfig, OmegaConf

from convmae_det.config import add_convmae_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ADE20K_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "ADE20K", "*.yaml")))
LAZY_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "toy", "*.py"))) + sorted(
    glob.glob(os.path.join(ROOT, "configs", "pretrain", "*toy.py"))
)
ALL_LAZY_CONFIGS = sorted(
    p
    for p in glob.glob(os.path.join(ROOT, "configs", "**", "*.py"), recursive=True)
    if os.sep + "common" + os.sep not in p
)


# ----------------------------------------------------------------------------------- payloads
def _side_effect_module(tmp_path, marker: str) -> str:
    """A module in ``tmp_path`` (put on ``sys.path`` by the caller) that creates ``marker`` when
    imported: ``!!python/name``, ``!!python/module`` and ``!!python/object`` import it."""
    name = f"cfg_payload_{uuid.uuid4().hex[:12]}"
    (tmp_path / f"{name}.py").write_text(
        f"open({marker!r}, 'w').close()\n\nclass Thing:\n    pass\n\n\nthing = 1\n"
    )
    return name


# form -> (YAML value text, the tag the error must name); {m}: marker, {mod}: module name
PAYLOADS: Dict[str, Tuple[str, str]] = {
    "object/apply": ('!!python/object/apply:os.system ["touch {m}"]', "!!python/object/apply:os.system"),
    "object/new": ('!!python/object/new:os.system ["touch {m}"]', "!!python/object/new:os.system"),
    "object": ("!!python/object:{mod}.Thing {{a: 1}}", "!!python/object:{mod}.Thing"),
    "name": ("!!python/name:{mod}.thing ''", "!!python/name:{mod}.thing"),
    "module": ("!!python/module:{mod} ''", "!!python/module:{mod}"),
}  # fmt: skip


def _payload(form: str, tmp_path, monkeypatch=None) -> Tuple[str, str, str]:
    """(YAML value, expected tag, marker path) of one payload form."""
    marker = str(tmp_path / f"MARKER_{form.replace('/', '_')}")
    mod = _side_effect_module(tmp_path, marker)
    if monkeypatch is not None:
        monkeypatch.syspath_prepend(str(tmp_path))
    value, tag = PAYLOADS[form]
    return value.format(m=marker, mod=mod), tag.format(mod=mod), marker


def _write(path, text: str) -> str:
    os.makedirs(os.path.dirname(str(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _yacs_files(where: str, value: str, tmp_path) -> Tuple[str, str]:
    """Write a yacs config with the payload ``value`` at ``where``; returns (config to load, file
    that holds the payload)."""
    d = tmp_path / "cfg"
    if where == "top":
        path = _write(d / "main.yaml", f"SEED: 3\nOUTPUT_DIR: {value}\n")
        return path, path
    if where == "nested":
        path = _write(d / "main.yaml", f"MODEL:\n  DEVICE: cpu\n  WEIGHTS: {value}\n")
        return path, path
    main = _write(d / "main.yaml", "_BASE_: base.yaml\nSOLVER:\n  BASE_LR: 0.5\n")
    if where == "base":
        return main, _write(d / "base.yaml", f"MODEL:\n  WEIGHTS: {value}\n")
    # base of a base, through the list form and a sub folder
    _write(d / "base.yaml", "_BASE_: [deeper/base2.yaml]\nSEED: 5\n")
    return main, _write(d / "deeper" / "base2.yaml", f"SOLVER:\n  IMS_PER_BATCH: {value}\n")


def _lazy_file(where: str, value: str, tmp_path) -> str:
    """A LazyConfig ``.yaml`` (the form ``LazyConfig.save`` writes) with the payload at ``where``."""
    body = {
        "top": f"model: {value}\ntrain: {{max_iter: 1}}\n",
        "nested": f"model: {{}}\ntrain:\n  max_iter: 1\n  output_dir: {value}\n",
        "in_list": f"dataloader:\n  train:\n    augmentations:\n    - {value}\ntrain: {{}}\n",
    }[where]
    return _write(tmp_path / "lazy" / "config.yaml", body)


def _check_refusal(exc: BaseException, path: str, tag: str) -> None:
    message = str(exc.args[0])
    assert "\n" not in message, message
    assert message.startswith(f"{path}: refused: the YAML tag '{tag}'"), message
    named = tag.startswith("!!python/name:") and "not in the modules a .yaml config may" in message
    assert named or message.endswith("config files may only hold plain values"), message


def _fresh_cfg():
    cfg = get_cfg()
    add_convmae_config(cfg)
    return cfg


# ------------------------------------------------------------------- yacs, through the library
def _via_get_seg_cfg(path):
    from convmae_det.engine.seg_train_loop import get_seg_cfg

    return get_seg_cfg(path)


def _via_load_any_config(path):
    from convmae_det.model_from_config import load_any_config

    return load_any_config(path)


def _via_merge_safely(path):
    from convmae_det.config import merge_config_file_safely

    return merge_config_file_safely(_fresh_cfg(), path)


YACS_LOADERS: Dict[str, Callable] = {
    "get_seg_cfg": _via_get_seg_cfg,
    "load_any_config": _via_load_any_config,
    "merge_config_file_safely": _via_merge_safely,
}


@pytest.mark.parametrize("loader", sorted(YACS_LOADERS))
@pytest.mark.parametrize("where", ["top", "nested", "base", "base_of_base"])
@pytest.mark.parametrize("form", sorted(PAYLOADS))
def test_yacs_payload_is_refused_naming_file_and_tag_and_never_runs(
    form, where, loader, tmp_path, monkeypatch
):
    value, tag, marker = _payload(form, tmp_path, monkeypatch)
    path, holder = _yacs_files(where, value, tmp_path)
    with pytest.raises(ValueError) as err:
        YACS_LOADERS[loader](path)
    assert not os.path.exists(marker), "the payload ran"
    _check_refusal(err.value, holder, tag)


def test_refusals_are_config_errors_that_the_tools_catch():
    """``ConfigError`` (convert / demo / benchmark) is a ``ValueError`` (the trainers' preflight)."""
    from convmae_det.config import ConfigError, UnsafeConfigError
    from convmae_det.model_from_config import ConfigError as ToolConfigError

    assert ToolConfigError is ConfigError and issubclass(UnsafeConfigError, ConfigError)
    assert issubclass(ConfigError, ValueError)  # tools: one line, exit code 2


def test_yacs_refusal_message_in_full(tmp_path):
    from convmae_det.config import UnsafeConfigError, merge_config_file_safely

    path = _write(
        tmp_path / "x.yaml", 'SEED: 1\nOUTPUT_DIR: !!python/object/apply:os.system ["true"]\n'
    )
    with pytest.raises(UnsafeConfigError) as err:
        merge_config_file_safely(_fresh_cfg(), path)
    assert str(err.value) == (
        f"{path}: refused: the YAML tag '!!python/object/apply:os.system' (line 2) would run "
        "code; config files may only hold plain values"
    )


def test_yacs_harmless_python_tag_and_bad_yaml_are_refused_with_one_line(tmp_path):
    from convmae_det.config import ConfigError, merge_config_file_safely

    tup = _write(tmp_path / "t.yaml", "MODEL:\n  PIXEL_STD: !!python/tuple [1.0, 1.0, 1.0]\n")
    with pytest.raises(ConfigError, match=r"tag '!!python/tuple' \(line 2\) is not a plain value"):
        merge_config_file_safely(_fresh_cfg(), tup)
    bad = _write(tmp_path / "b.yaml", "MODEL: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        merge_config_file_safely(_fresh_cfg(), bad)
    assert str(err.value).startswith(f"{bad}: not valid YAML") and "\n" not in str(err.value)
    missing = _write(tmp_path / "m.yaml", "_BASE_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        merge_config_file_safely(_fresh_cfg(), missing)


@pytest.mark.parametrize("path", ADE20K_CONFIGS, ids=os.path.basename)
def test_shipped_yacs_configs_resolve_exactly_as_with_the_old_unsafe_merge(path):
    from convmae_det.config import merge_config_file_safely

    old = _fresh_cfg()
    old.merge_from_file(path)  # detectron2's default: allow_unsafe=True (trusted, shipped file)
    new = merge_config_file_safely(_fresh_cfg(), path)
    assert new == old
    assert new.dump() == old.dump()


@pytest.mark.parametrize("path", ADE20K_CONFIGS, ids=os.path.basename)
def test_dumped_yacs_config_loads_back_through_the_safe_path(path, tmp_path):
    """``output/config.yaml`` of a segmentation run (``cfg.dump()``) loads back identically."""
    from convmae_det.config import merge_config_file_safely
    from convmae_det.engine.seg_train_loop import get_seg_cfg

    cfg = get_seg_cfg(path)
    saved = _write(tmp_path / "config.yaml", cfg.dump())
    back = merge_config_file_safely(_fresh_cfg(), saved)
    old = _fresh_cfg()
    old.merge_from_file(saved)  # the unsafe default, on our own dump
    assert back == old
    # equal to the run's config too, up to yacs' own list/tuple coercion of nested tuples
    assert yaml.safe_load(back.dump()) == yaml.safe_load(cfg.dump())


# ------------------------------------------------------------- LazyConfig .yaml, the library
def _via_load_lazy_config(path):
    from convmae_det.engine import load_lazy_config

    return load_lazy_config(path)


def _via_load_lazy_config_safely(path):
    from convmae_det.config import load_lazy_config_safely

    return load_lazy_config_safely(path)


LAZY_LOADERS: Dict[str, Callable] = {
    "load_lazy_config": _via_load_lazy_config,
    "load_lazy_config_safely": _via_load_lazy_config_safely,
}


@pytest.mark.parametrize("loader", sorted(LAZY_LOADERS))
@pytest.mark.parametrize("where", ["top", "nested", "in_list"])
@pytest.mark.parametrize("form", sorted(PAYLOADS))
def test_lazy_yaml_payload_is_refused_naming_file_and_tag_and_never_runs(
    form, where, loader, tmp_path, monkeypatch
):
    value, tag, marker = _payload(form, tmp_path, monkeypatch)
    path = _lazy_file(where, value, tmp_path)
    with pytest.raises(ValueError) as err:
        LAZY_LOADERS[loader](path)
    assert not os.path.exists(marker), "the payload ran"
    _check_refusal(err.value, path, tag)


def _instantiate_everything(cfg: DictConfig) -> None:
    for key in cfg:
        instantiate(cfg[key])


@pytest.mark.parametrize("loader", sorted(LAZY_LOADERS))
def test_lazy_yaml_target_outside_the_allowed_modules_is_refused(loader, tmp_path):
    """``_target_`` is called by ``instantiate``: a plain-YAML ``subprocess.run`` runs code too."""
    marker = str(tmp_path / "MARKER_target")
    path = _write(
        tmp_path / "t.yaml",
        f"model:\n  _target_: subprocess.run\n  args: [touch, {marker}]\ntrain: {{}}\n",
    )
    try:
        with pytest.raises(ValueError) as err:
            _instantiate_everything(LAZY_LOADERS[loader](path))
    finally:
        assert not os.path.exists(marker), "the payload ran"
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: refused: '_target_' at key 'model' names 'subprocess.run'")


@pytest.mark.parametrize(
    "target",
    [
        "detectron2.data.common.pickle.loads",  # allowed-looking path to a builtin elsewhere
        "torch.nn.modules.module.torch.load",
        "convmae_det.checkpoint.io.load_checkpoint_file",  # allow_unsafe=True would unpickle
        # the classification recipes allow timm's mixup, losses and LARS, not the rest of timm
        "timm.models.load_checkpoint",  # torch.load of a file named in the config
        "timm.data.mixup.torch.load",
        "timm.loss.cross_entropy.torch.load",
        "timm.data.create_dataset",
    ],
)
def test_lazy_yaml_target_is_checked_where_it_resolves_not_by_its_spelling(target, tmp_path):
    from convmae_det.config import UnsafeConfigError, load_lazy_config_safely

    path = _write(tmp_path / "t.yaml", f"model: {{_target_: {target}}}\n")
    with pytest.raises(UnsafeConfigError, match=f"'_target_' at key 'model' names '{target}'"):
        load_lazy_config_safely(path)


@pytest.mark.parametrize(
    "body",
    [
        "model: \"${{oc.create:'{{_target_: subprocess.run, args: [touch, {m}]}}'}}\"\n",
        "model: \"${{oc.decode:'{{_target_: subprocess.run, args: [touch, {m}]}}'}}\"\n",
        "evil: subprocess.run\nmodel: {{_target_: '${{evil}}', args: [touch, {m}]}}\n",
    ],
    ids=["oc.create", "oc.decode", "interpolated_target"],
)
def test_lazy_yaml_resolvers_and_interpolated_targets_are_refused(body, tmp_path):
    """``${oc.create:...}`` builds a node with a ``_target_`` when resolved: refused as well."""
    from convmae_det.config import UnsafeConfigError, load_lazy_config_safely

    marker = str(tmp_path / "MARKER_resolver")
    path = _write(tmp_path / "r.yaml", body.format(m=marker))
    try:
        with pytest.raises(UnsafeConfigError, match=f"^{path}: refused: "):
            _instantiate_everything(load_lazy_config_safely(path))
    finally:
        assert not os.path.exists(marker), "the payload ran"


@pytest.mark.parametrize(
    "body",
    [
        "dataloader:\n  train:\n    dataset:\n      _target_: detectron2.data.get_detection_dataset_dicts"
        "\n      names: x\n      proposal_files: [{pkl}]\n",
        "p: {{_target_: detectron2.data.build.load_proposals_into_dataset, dataset_dicts: [],"
        " proposal_file: {pkl}}}\n",
        "loader:\n  _target_: detectron2.data.build_detection_test_loader\n  dataset_name: x\n"
        "  cfg: {{MODEL: {{LOAD_PROPOSALS: true}}, DATASETS: {{PROPOSAL_FILES_TEST: [{pkl}]}}}}\n",
    ],
    ids=["get_detection_dataset_dicts", "load_proposals_into_dataset", "configurable_cfg"],
)
def test_lazy_yaml_proposal_files_are_refused_since_detectron2_unpickles_them(body, tmp_path):
    """An allowed ``_target_`` that would ``pickle.load`` a file the config names is refused."""
    from convmae_det.config import UnsafeConfigError, load_lazy_config_safely

    marker = str(tmp_path / "MARKER_pickle")
    pkl = tmp_path / "proposals.pkl"
    pkl.write_bytes(b"cos\nsystem\n(S'touch " + marker.encode() + b"'\ntR.")
    path = _write(tmp_path / "p.yaml", body.format(pkl=pkl))
    try:
        with pytest.raises(UnsafeConfigError, match=f"^{path}: refused: key .* proposal files"):
            _instantiate_everything(load_lazy_config_safely(path))
    finally:
        assert not os.path.exists(marker), "the payload ran"


def test_lazy_yaml_plain_interpolations_and_allowed_names_are_accepted(tmp_path):
    from convmae_det.config import load_lazy_config_safely

    path = _write(
        tmp_path / "ok.yaml",
        "optimizer:\n  _target_: torch.optim.SGD\n  lr: 0.1\n  momentum: ${.lr}\n"
        "norm: !!python/object/apply:functools.partial\n"
        "  args: [&f !!python/name:torch.nn.modules.normalization.LayerNorm '']\n"
        "  state: !!python/tuple [*f, !!python/tuple [8], {eps: 1.0e-06}, null]\n",
    )
    cfg = load_lazy_config_safely(path)
    assert isinstance(cfg, DictConfig) and cfg.optimizer.momentum == 0.1
    norm = cfg.norm()
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-6 and norm.weight.shape == (8,)


def _as_text(cfg: DictConfig) -> str:
    return yaml.dump(OmegaConf.to_container(cfg, resolve=False), default_flow_style=None)


@pytest.mark.parametrize("path", LAZY_CONFIGS, ids=os.path.basename)
def test_saved_lazy_config_loads_back_through_the_safe_path(path, tmp_path):
    """``LazyConfig.save`` output (``config.yaml`` in output folders, written with Python tags for
    ``ShapeSpec`` and ``functools.partial``) loads through our path exactly as detectron2's unsafe
    loader reads it, and builds the same model."""
    from convmae_det.config import load_lazy_config_safely
    from convmae_det.engine import load_lazy_config

    original = LazyConfig.load(path)
    saved = str(tmp_path / "config.yaml")
    LazyConfig.save(original, saved)
    assert not os.path.exists(saved + ".pkl")
    ours = load_lazy_config_safely(saved)
    assert isinstance(ours, DictConfig)
    assert _as_text(ours) == _as_text(LazyConfig.load(saved))  # detectron2's reading
    assert _as_text(load_lazy_config(saved)) == _as_text(LazyConfig.load(saved))
    torch.manual_seed(0)
    expected = instantiate(original.model)
    torch.manual_seed(0)
    model = instantiate(ours.model)
    assert type(model) is type(expected)
    got = model.state_dict()
    assert list(got) == list(expected.state_dict())
    assert all(torch.equal(got[k], v) for k, v in expected.state_dict().items())
    params = OmegaConf.select(ours, "optimizer.params", default=None)
    if params is not None and params.get("lr_factor_func") is not None:
        func, expected_func = params.lr_factor_func, original.optimizer.params.lr_factor_func
        assert isinstance(func, functools.partial)
        for name in ("backbone.bottom_up.blocks3.0.attn.qkv.weight", "roi_heads.box_head.fc1"):
            assert func(name) == expected_func(name)


@pytest.mark.parametrize(
    "path", ALL_LAZY_CONFIGS, ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "configs"))
)
def test_every_shipped_lazy_config_saved_as_yaml_passes_the_safe_path(path, tmp_path):
    """Every ``_target_`` / ``!!python/name`` of the shipped configs is in
    ``YAML_CALLABLE_MODULES`` (a new config naming something else fails here first)."""
    from convmae_det.config import load_lazy_config_safely

    saved = str(tmp_path / "config.yaml")
    LazyConfig.save(LazyConfig.load(path), saved)
    assert _as_text(load_lazy_config_safely(saved)) == _as_text(LazyConfig.load(saved))


# ---------------------------------------------------------------------- through every tool
def _tool(tmp_path, *args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}",  # the side-effect modules are importable
        "OMP_NUM_THREADS": "1",
        "DETECTRON2_DATASETS": str(tmp_path / "datasets"),
    }
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=str(tmp_path), env=env,
        timeout=600,
    )  # fmt: skip


def _check_tool_refusal(proc, holder: str, tag: str, marker: str) -> None:
    out = proc.stdout + proc.stderr
    assert not os.path.exists(marker), "the payload ran:\n" + out[-3000:]
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    errors: List[str] = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr[-3000:]
    assert errors[0].startswith(f"error: {holder}: refused: the YAML tag '{tag}'"), errors[0]


def _tool_path(name: str) -> str:
    return os.path.join(ROOT, "tools", name)


YACS_TOOLS: Dict[str, Callable[[str, object], List[str]]] = {
    "plain_train_net": lambda cfg, tmp: [
        _tool_path("plain_train_net.py"), "--config-file", cfg, "OUTPUT_DIR", str(tmp / "out")
    ],
    "demo": lambda cfg, tmp: [
        _tool_path("demo.py"), "--config-file", cfg, "--input", str(tmp / "x.png"),
        "--output", str(tmp / "out"), "--device", "cpu",
    ],
    "convert_checkpoint": lambda cfg, tmp: [
        _tool_path("convert_checkpoint.py"), _small_checkpoint(tmp), str(tmp / "dst.pth"),
        "--config-file", cfg,
    ],
    "benchmark": lambda cfg, tmp: [
        _tool_path("benchmark.py"), "--config-file", cfg, "--device", "cpu", "--no-flops",
        "--peak-tflops", "0", "--iters", "1", "--warmup", "0",
    ],
}  # fmt: skip


def _small_checkpoint(tmp_path) -> str:
    path = str(tmp_path / "src.pth")
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    return path


@pytest.mark.parametrize("tool", sorted(YACS_TOOLS))
def test_yacs_payload_through_each_tool_is_one_line_exit_2_and_never_runs(tool, tmp_path):
    value, tag, marker = _payload("object/apply", tmp_path)
    path, holder = _yacs_files("top", value, tmp_path)
    proc = _tool(tmp_path, *YACS_TOOLS[tool](path, tmp_path))
    _check_tool_refusal(proc, holder, tag, marker)


def test_payload_in_a_base_of_a_base_through_plain_train_net(tmp_path):
    value, tag, marker = _payload("module", tmp_path)  # importable through PYTHONPATH
    path, holder = _yacs_files("base_of_base", value, tmp_path)
    proc = _tool(tmp_path, *YACS_TOOLS["plain_train_net"](path, tmp_path))
    _check_tool_refusal(proc, holder, tag, marker)


@pytest.mark.parametrize("tool", ["lazyconfig_train_net.py", "pretrain.py"])
def test_lazy_yaml_payload_through_each_lazy_tool_is_one_line_exit_2(tool, tmp_path):
    value, tag, marker = _payload("object/new", tmp_path)
    path = _lazy_file("nested", value, tmp_path)
    proc = _tool(tmp_path, _tool_path(tool), "--config-file", path)
    _check_tool_refusal(proc, path, tag, marker)
