"""Config: every Hydra option composes into a valid TrainConfig; from_dict rejects bad input."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import hydra
import pytest
import yaml
from omegaconf import OmegaConf

from satrun.cli.configs import config_dir, store_schema
from satrun.config import AdapterConfig, DataConfig, ModeConfig, ModelConfig, TrainConfig, from_dict
from satrun.errors import UsageError

CONF = Path(config_dir())
# Discovered from the files, so a new option is covered without touching this test.
OPTIONS = sorted((p.parent.name, p.stem) for p in CONF.glob("*/*.yaml"))
DEFAULTS = {
    k.removeprefix("optional "): v
    for entry in yaml.safe_load((CONF / "train.yaml").read_text(encoding="utf-8"))["defaults"]
    if isinstance(entry, dict)
    for k, v in entry.items()
}  # calibration: ${model}_${mode}_${scheduler}_${adapter} (the chosen model's calibration file for the mode, schedule and adapter, where it has one)
NAMED = {"model": ModelConfig, "data": DataConfig, "mode": ModeConfig}  # groups whose option sets `name`


@pytest.fixture(scope="module")
def compose():
    store_schema()
    with hydra.initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        yield lambda *overrides: hydra.compose("train", overrides=list(overrides))


def _typed(compose, *overrides: str) -> TrainConfig:
    """from_dict of the composed config, adding a placeholder path where validation asks for one."""
    overrides = list(overrides)
    for _ in range(3):
        try:
            return from_dict(compose(*overrides))
        except UsageError as exc:
            missing = [k for k in ("data.path", "model.path") if k in str(exc) and f"{k}=x" not in overrides]
            if not missing:
                raise
            overrides.append(f"{missing[0]}=x")
    raise AssertionError("unreachable")


def test_options_are_discovered():
    groups = {g for g, _ in OPTIONS}
    assert {"model", "data", "mode", "optim"} <= groups
    assert ("model", "tiny") in OPTIONS and ("data", "chatterbot") in OPTIONS and ("mode", "sft") in OPTIONS
    assert set(DEFAULTS) == groups
    assert all((g, o) in OPTIONS for g, o in DEFAULTS.items() if g != "calibration")
    # a model's measured rates for the chosen schedule, where they exist (dense has none)
    assert DEFAULTS["calibration"] == "${model}_${mode}_${scheduler}_${adapter}"
    for mode in ("cpt", "sft"):
        for adapter in ("none", "lora"):
            assert ("calibration", f"{DEFAULTS['model']}_{mode}_{DEFAULTS['scheduler']}_{adapter}") in OPTIONS
            assert ("calibration", f"{DEFAULTS['model']}_{mode}_dense_{adapter}") not in OPTIONS


def test_default_config_composes(compose):
    cfg = from_dict(compose())
    assert isinstance(cfg, TrainConfig)
    for group, cls in NAMED.items():
        assert getattr(cfg, group).name == DEFAULTS[group]


@pytest.mark.parametrize("group, option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(compose, group, option):
    # The default model's calibration sets scheduler values on purpose: leave it out when
    # checking that a scheduler option's own values arrive.
    overrides = [f"{group}={option}"] + (["~calibration"] if group == "scheduler" else [])
    raw = compose(*overrides)
    assert "hydra" not in raw
    cfg = _typed(compose, *overrides)
    assert isinstance(cfg, TrainConfig)
    for g, cls in NAMED.items():
        section = getattr(cfg, g)
        assert isinstance(section, cls)
        assert section.name == (option if g == group else DEFAULTS[g])
    # Every value the option file sets for its own group made it into the typed config. (Values a
    # global-package option sets in other groups are checked by the dedicated tests below.)
    text = (CONF / group / f"{option}.yaml").read_text(encoding="utf-8")
    file_values = OmegaConf.to_container(OmegaConf.load(CONF / group / f"{option}.yaml")) or {}
    if group == "calibration":  # `# @package scheduler`: a model's scheduler values, or those of the ones it includes
        included = [OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml"))
                    for name in file_values.pop("defaults", []) if name != "_self_"]
        group, file_values = "scheduler", {"scheduler": {k: v for d in [*included, file_values] for k, v in d.items()}}
    elif "@package _global_" not in text:
        file_values = {group: file_values}
    composed = OmegaConf.to_container(OmegaConf.structured(cfg))
    for key, value in file_values.get(group, {}).items():
        if value is None:
            continue  # a placeholder (e.g. data.path) filled in by _typed
        got = composed[group][key]
        assert (list(got) if isinstance(got, tuple) else got) == value, f"{group}.{key}"


def test_pretrained_models_need_a_path(compose):
    pretrained = [o for g, o in OPTIONS if g == "model" and compose(f"model={o}").model.get("source") == "pretrained"]
    assert pretrained
    for option in pretrained:
        assert from_dict(compose(f"model={option}")).model.path
        with pytest.raises(UsageError, match="model.path"):
            from_dict(compose(f"model={option}", "model.path=null"))


@pytest.mark.parametrize("fmt", ["text", "jsonl", "parquet", "hub"])
def test_user_data_needs_a_path(compose, fmt):
    with pytest.raises(UsageError, match="data.path"):
        from_dict(compose(f"data={fmt}"))
    assert from_dict(compose(f"data={fmt}", "data.path=somewhere")).data.path == "somewhere"


def test_command_line_values_reach_the_typed_config(compose):
    cfg = from_dict(compose("model=tiny", "trainer.max_steps=70", "optim.lr=0.01", "optim.betas=[0.8,0.9]"))
    assert cfg.trainer.max_steps == 70 and cfg.optim.lr == 0.01
    assert list(cfg.optim.betas) == [0.8, 0.9]
    with pytest.raises(UsageError, match="trainer.micro_batch_size"):
        from_dict(compose("trainer.micro_batch_size=0"))


def test_from_dict_accepts_plain_dicts_and_defaults():
    cfg, defaults = from_dict({}), TrainConfig()
    for section in ("model", "data", "mode", "trainer"):
        assert getattr(cfg, section) == getattr(defaults, section)
    assert tuple(cfg.optim.betas) == defaults.optim.betas
    assert dataclasses.replace(cfg.optim, betas=defaults.optim.betas) == defaults.optim
    cfg = from_dict({"trainer": {"seq_len": 64}, "model": {"source": "random", "name": "x"}})
    assert cfg.trainer.seq_len == 64 and cfg.model.source == "random"
    assert cfg.trainer.micro_batch_size == TrainConfig().trainer.micro_batch_size


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"bogus": 1}, "bogus"),
        ({"trainer": {"bogus": 1}}, "bogus"),
        ({"optim": {"learning_rate": 0.1}}, "learning_rate"),
        ({"data": {"paths": "x"}}, "paths"),
    ],
)
def test_unknown_keys_are_rejected(raw, key):
    with pytest.raises(UsageError) as info:
        from_dict(raw)
    assert repr(key) in str(info.value) or key in str(info.value)


WRONG_TYPES = [
    ({"trainer": {"max_steps": "many"}}, "trainer.max_steps"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"trainer": {"activation_checkpointing": "maybe"}}, "trainer.activation_checkpointing"),
    ({"data": {"eval_fraction": "some"}}, "data.eval_fraction"),
]


@pytest.mark.parametrize("raw, key", WRONG_TYPES)
def test_wrong_types_are_rejected_naming_the_key(raw, key):
    with pytest.raises(UsageError, match="invalid config") as info:
        from_dict(raw)
    assert key in str(info.value)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({"trainer": {"micro_batch_size": 0}}, "trainer.micro_batch_size"),
        ({"trainer": {"max_steps": -3}}, "trainer.max_steps"),
        ({"trainer": {"seq_len": 0}}, "trainer.seq_len"),
        ({"trainer": {"seed": -1}}, "trainer.seed"),
        ({"trainer": {"seed": 2**32}}, "trainer.seed"),
        ({"plan": {"ranks": 0}}, "plan.ranks"),
        ({"selector": {"name": "topk", "temperature": 2.0}}, "selector.temperature=2.0 does nothing with selector=topk"),
        ({"metric": {"name": "wanda", "token_stride": 4}}, "metric.token_stride=4 does nothing with metric=wanda"),
        ({"launcher": {"name": "none", "nproc_per_node": 4}}, "launcher.nproc_per_node=4 does nothing"),
        ({"scheduler": {"name": "dense", "rate": 0.3}}, "scheduler.rate=0.3 does nothing with scheduler=dense"),
        ({"scheduler": {"name": "constant", "dense_fraction": 0.2}}, "scheduler.dense_fraction=0.2 does nothing"),
        ({"scheduler": {"name": "dense"}, "metric": {"name": "wanda"}}, "metric=wanda does nothing with scheduler=dense"),
        ({"scheduler": {"name": "dense"}, "selector": {"fill": "zero"}}, "selector.fill=zero does nothing with scheduler=dense"),
        ({"logger": {"name": "jsonl", "project": "mine"}}, "logger.project=mine does nothing with logger=jsonl"),
        ({"logger": {"name": "tensorboard", "mode": "online"}}, "logger.mode=online does nothing with logger=tensorboard"),
        ({"data": {"hub_config": "en"}}, "data.hub_config=en does nothing with data.format=bible"),
        ({"data": {"name": "mine", "format": "jsonl", "path": "x.jsonl", "sample_by": "line"}},
         "data.sample_by=line does nothing with data.format=jsonl"),
        ({"trainer": {"eval_every": -1}}, "trainer.eval_every"),
        ({"trainer": {"precision": "fp16"}}, "trainer.precision"),
        ({"trainer": {"progress": "spinner"}}, "trainer.progress"),
        ({"optim": {"schedule": "bogus"}}, "optim.schedule"),
        ({"optim": {"lr": 0.0}}, "optim.lr"),
        ({"optim": {"min_lr_ratio": 1.5}}, "optim.min_lr_ratio"),
        ({"optim": {"warmup_steps": -1}}, "optim.warmup_steps"),
        ({"optim": {"weight_decay": -0.1}}, "optim.weight_decay"),
        ({"data": {"eval_fraction": 1.5}}, "data.eval_fraction"),
        ({"data": {"eval_fraction": 0.0}}, "data.eval_fraction"),
        ({"data": {"eval_fraction": 1.0}}, "data.eval_fraction"),
        ({"data": {"format": "csv"}}, "data.format"),
        ({"data": {"sample_by": "sentence"}}, "data.sample_by"),
        ({"mode": {"name": "rlhf"}}, "mode.name"),
        ({"model": {"source": "hub"}}, "model.source"),
        ({"model": {"source": "pretrained", "path": None}}, "model.path"),
        ({"data": {"format": "text"}}, "data.path"),
    ],
)
def test_invalid_values_are_rejected_naming_the_key(raw, key):
    with pytest.raises(UsageError) as info:
        from_dict(raw)
    assert key in str(info.value)


def test_betas_need_two_values():
    with pytest.raises(UsageError, match="optim.betas"):
        from_dict({"optim": {"betas": [0.9]}})


def test_mode_sft_sets_mode_name(compose):
    assert from_dict(compose("mode=sft")).mode.name == "sft"
    assert from_dict(compose("mode=cpt")).mode.name == "cpt"


def test_mode_sft_uses_a_lower_learning_rate(compose):
    sft, cpt = from_dict(compose("mode=sft")), from_dict(compose("mode=cpt"))
    assert sft.optim.lr < cpt.optim.lr
    sft_file = yaml.safe_load((CONF / "mode" / "sft.yaml").read_text(encoding="utf-8"))
    assert sft.optim.lr == sft_file["optim"]["lr"]
    assert sft.optim.warmup_steps == sft_file["optim"]["warmup_steps"]


def test_explicit_lr_override_wins_in_sft(compose):
    assert from_dict(compose("mode=sft", "optim.lr=1e-5")).optim.lr == 1e-5


def test_dataclass_defaults_validate():
    # The typed defaults themselves are a valid configuration.
    cfg = TrainConfig()
    from satrun.checks import validate

    validate(cfg)
    assert dataclasses.asdict(cfg)["mode"] == {"name": "cpt", "train_on_inputs": False}


def test_the_dataclasses_are_the_one_source_of_defaults(compose):
    """conf/train.yaml chooses group options only; loop, plan, bench and probe settings come
    from the dataclasses (what --help lists), so the two cannot disagree."""
    cfg, defaults = from_dict(compose()), TrainConfig()
    for section in ("trainer", "plan", "bench", "probe", "launcher", "logger"):
        assert getattr(cfg, section) == getattr(defaults, section), section
    assert set(OmegaConf.load(CONF / "train.yaml")) == {"defaults", "hydra"}


def test_heads_under_the_token_split_and_packing_in_cpt_are_refused(compose) -> None:
    with pytest.raises(UsageError, match="heads are kept when only unlabelled tokens omit neurons"):
        _typed(compose, "mode=sft", "scheduler=constant")  # constant omits heads at the rate by default
    assert _typed(compose, "mode=sft", "scheduler=constant", "scheduler.attn_rate=0").scheduler.attn_rate == 0.0
    assert _typed(compose, "mode=sft", "scheduler=constant", "scheduler.tokens=all").scheduler.attn_rate is None
    with pytest.raises(UsageError, match="data.packing=true packs chats"):
        _typed(compose, "data.packing=true")
    with pytest.raises(UsageError, match="with mode=cpt every token carries one"):
        _typed(compose, "scheduler.tokens=unlabelled")
    with pytest.raises(UsageError, match="does nothing with scheduler=dense"):
        _typed(compose, "mode=sft", "scheduler=dense", "scheduler.tokens=unlabelled")
    sft = _typed(compose, "mode=sft", "data=chatterbot")
    assert sft.data.packing and sft.scheduler.tokens == "auto" and sft.scheduler.omit == "backward"
    assert sft.scheduler.rate == 0.95 and len(sft.scheduler.layer_scale) == 30
    paper = _typed(compose, "mode=sft", "data=chatterbot", "calibration=smollm2-135m_sft_ladder_none_forward")
    assert paper.scheduler.omit == "forward" and paper.scheduler.rate == pytest.approx(0.606667)


@pytest.mark.parametrize("mode", ["cpt", "sft"])
def test_lora_sets_its_own_learning_rate_in_either_mode_and_an_override_wins(compose, mode):
    lora_file = yaml.safe_load((CONF / "adapter" / "lora.yaml").read_text(encoding="utf-8"))
    lora, full = from_dict(compose(f"mode={mode}", "adapter=lora")), from_dict(compose(f"mode={mode}"))
    assert lora.optim.lr == lora_file["optim"]["lr"] > full.optim.lr and lora.adapter.name == lora_file["adapter"]["name"]
    assert lora.adapter.r == AdapterConfig().r  # the dataclass's default: the file sets only what differs
    assert from_dict(compose(f"mode={mode}", "adapter=lora", "optim.lr=1e-4")).optim.lr == 1e-4


def test_lora_sft_takes_its_own_calibration_and_lora_cpt_full_fine_tunings(compose):
    def rates(*overrides):  # type: ignore[no-untyped-def]
        s = from_dict(compose(*overrides)).scheduler
        return s.rate, list(s.layer_scale or [])

    own = OmegaConf.to_container(OmegaConf.load(CONF / "calibration" / "smollm2-135m_sft_ladder_lora.yaml"))
    assert rates("mode=sft", "adapter=lora") == (own["rate"], own["layer_scale"]) != rates("mode=sft")
    # LoRA CPT takes full fine-tuning's paper-form schedule (scheduler.omit=backward takes no adapters yet)
    assert rates("adapter=lora") == rates("calibration=smollm2-135m_cpt_ladder_none_forward") != rates()
    assert rates("adapter=lora", "scheduler=constant") == rates("scheduler=constant")
    assert from_dict(compose()).scheduler.omit == "backward" and from_dict(compose("adapter=lora")).scheduler.omit == "forward"


def test_sft_record_settings_are_read_where_they_are_set_and_refused_elsewhere(compose) -> None:
    from satrun.config import sparse_tokens

    jsonl = ["mode=sft", "data=jsonl", "data.path=x.jsonl"]
    for args, says in ((["data.schema=alpaca", "data.prompt_field=q"], "data.prompt_field=q does nothing with data.schema=alpaca"),
                       (["data.messages_field=chat"], "data.schema=messages reads chats"),
                       (["data.schema=yaml"], "data.schema='yaml' is not one of"),
                       (["mode=cpt", "data.schema=messages"], "does nothing with mode=cpt"),
                       (["mode=cpt", "mode.train_on_inputs=true"], "mode.train_on_inputs=true does nothing with mode=cpt"),
                       (["mode.train_on_inputs=true", "scheduler.tokens=unlabelled"], "with mode.train_on_inputs=true every token")):
        with pytest.raises(UsageError, match=re.escape(says)):
            _typed(compose, *jsonl, *args)
    with pytest.raises(UsageError, match="does nothing with data.format=chatterbot"):
        _typed(compose, "mode=sft", "data=chatterbot", "data.schema=alpaca")
    assert _typed(compose, "mode=sft", "data=chatterbot", "data.system_prompt=Be brief.").data.system_prompt == "Be brief."
    cfg = _typed(compose, *jsonl, "data.schema=messages", "data.messages_field=chat", "data.system_field=sys")
    assert (cfg.data.schema, cfg.data.messages_field, cfg.data.system_field) == ("messages", "chat", "sys")
    assert sparse_tokens(_typed(compose, *jsonl)) == "unlabelled"
    assert sparse_tokens(_typed(compose, *jsonl, "mode.train_on_inputs=true")) == "all"  # every token carries a loss


def test_the_backward_omission_takes_rate_one_and_refuses_what_it_does_not_read(compose) -> None:
    backward = ["scheduler.omit=backward", "scheduler.layer_scale=null"]
    cfg = _typed(compose, "mode=sft", "data=chatterbot", *backward, "scheduler.rate=1.0")
    assert cfg.scheduler.omit == "backward" and cfg.scheduler.rate == 1.0
    with pytest.raises(UsageError, match=r"scheduler.rate=1.0 must be in \[0, 1\)"):
        _typed(compose, "mode=sft", "data=chatterbot", "scheduler.omit=forward", "scheduler.rate=1.0")
    with pytest.raises(UsageError, match="omits MLP channels only: set scheduler.attn_rate=0"):
        _typed(compose, *backward, "scheduler=constant", "~calibration")  # constant omits heads at the rate by default
    assert _typed(compose, *backward, "scheduler=constant", "scheduler.attn_rate=0").scheduler.omit == "backward"
    # the metric and selector options set keys this form does not read: they still compose with it
    assert _typed(compose, *backward, "metric=maxip", "selector=topk").selector.fill == "zero"
    with pytest.raises(UsageError, match="scheduler.omit=backward computes MLPs without adapters"):
        _typed(compose, *backward, "adapter=lora")
    with pytest.raises(UsageError, match="scheduler.omit='sideways' is not one of: forward, backward"):
        _typed(compose, "scheduler.omit=sideways")
    with pytest.raises(UsageError, match="does nothing with scheduler=dense"):
        _typed(compose, "scheduler=dense", "scheduler.omit=backward")


def test_group_files_set_only_what_differs_from_the_dataclass_defaults() -> None:
    """The dataclasses are the one source of defaults: a settings group's file that restates one
    would keep its old value silently once the default changes (an option's ``name`` is its
    choice; model, data and calibration files describe one model, dataset or measurement whole)."""
    import dataclasses

    import yaml

    from satrun.cli.configs import config_dir

    defaults = TrainConfig()
    restated = []
    for path in sorted(config_dir().glob("*/*.yaml")):
        text = path.read_text()
        values = yaml.safe_load(text) or {}
        tree = values if "@package _global_" in text else {path.parent.name: values}
        if path.parent.name in ("calibration", "model", "data"):  # a measured setting, a model, a dataset: stated whole
            continue
        for section, keys in tree.items():
            group = getattr(defaults, section)
            for key, value in (keys or {}).items():
                if key == "defaults":  # a file that includes another
                    continue
                default = getattr(group, key)
                default = list(default) if isinstance(default, tuple) else default
                if key != "name" and value == default:
                    restated.append(f"{path.parent.name}/{path.name}: {section}.{key}={value}")
    assert not restated, restated
    assert dataclasses.is_dataclass(defaults)
