"""The blocking and the asyncio SDK offer the same calls, spelled and documented the same.

Every public method of ``Client`` and of each object reached through its properties
(``client.feedback``, ``client.review``, ``client.finetune``) and of the stream it returns
(``ScoreStream``) must have an async twin with the same parameters (names, kinds, defaults,
annotations) and the same docstring; return annotations may differ only by ``Async`` names.
"""

from __future__ import annotations

import importlib.util
import inspect
import pathlib
import re
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import clinisynth

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENDPOINTS = {s: "localhost:1" for s in ("generator", "reward", "counterfactual", "finetune")}


def _public(cls: type) -> dict[str, Any]:
    return {
        name: value
        for name, value in inspect.getmembers(cls)
        if not name.startswith("_") and (inspect.isfunction(value) or isinstance(value, property))
    }


def _pairs() -> Iterator[tuple[str, type, type]]:
    """(path, sync class, async class) for the client and every object it hands out."""
    sync, aio = clinisynth.Client(endpoints=ENDPOINTS), clinisynth.AsyncClient(endpoints=ENDPOINTS)
    yield "client", type(sync), type(aio)
    for name, member in _public(type(sync)).items():
        if isinstance(member, property):
            value, twin = getattr(sync, name), getattr(aio, name)
            if type(value) is not type(twin) and _public(type(value)):  # a twinned sub-object
                yield f"client.{name}", type(value), type(twin)
    yield "score_stream()", clinisynth.ScoreStream, clinisynth.AsyncScoreStream
    sync.close()


PAIRS = list(_pairs())


def _fn(member: Any) -> Callable[..., Any]:
    """The function behind a method or a property."""
    fn = member.fget if isinstance(member, property) else member
    assert callable(fn)
    return fn


def _unasync(text: str) -> str:
    return re.sub(r"\bAsync(?=[A-Z])", "", text)


def _params(fn: Any) -> list[tuple[str, str, str, str]]:
    return [
        (p.name, p.kind.name, repr(p.default), str(p.annotation))
        for p in inspect.signature(fn).parameters.values()
    ]


def test_sub_objects_are_found() -> None:
    assert {path for path, _, _ in PAIRS} >= {
        "client",
        "client.feedback",
        "client.review",
        "client.finetune",
        "score_stream()",
    }


@pytest.mark.parametrize(("path", "sync_cls", "async_cls"), PAIRS, ids=[p[0] for p in PAIRS])
def test_every_sync_method_has_an_identical_async_twin(
    path: str, sync_cls: type, async_cls: type
) -> None:
    sync, aio = _public(sync_cls), _public(async_cls)
    assert sorted(sync) == sorted(aio), f"{path}: methods differ"
    for name, member in sync.items():
        twin = aio[name]
        where = f"{path}.{name}"
        assert isinstance(twin, property) == isinstance(member, property), where
        member, twin = _fn(member), _fn(twin)
        assert _params(member) == _params(twin), f"{where}: parameters differ"
        sync_ret = inspect.signature(member).return_annotation
        async_ret = inspect.signature(twin).return_annotation
        assert sync_ret == _unasync(async_ret), f"{where}: returns differ"
        assert inspect.getdoc(member) == inspect.getdoc(twin), f"{where}: docstrings differ"


def test_constructors_match() -> None:
    assert _params(clinisynth.Client.__init__) == _params(clinisynth.AsyncClient.__init__)


@pytest.mark.parametrize(("path", "sync_cls", "async_cls"), PAIRS, ids=[p[0] for p in PAIRS])
def test_every_public_method_is_documented(path: str, sync_cls: type, async_cls: type) -> None:
    for cls in (sync_cls, async_cls):
        for name, member in _public(cls).items():
            assert (inspect.getdoc(_fn(member)) or "").strip(), (
                f"{cls.__name__}.{name} has no docstring"
            )


@pytest.mark.parametrize(("path", "sync_cls", "async_cls"), PAIRS, ids=[p[0] for p in PAIRS])
def test_public_signatures_are_typed_keywords(path: str, sync_cls: type, async_cls: type) -> None:
    """No ``**options`` hiding the signature; every parameter annotated."""
    for name, member in _public(sync_cls).items():
        for p in inspect.signature(_fn(member)).parameters.values():
            if p.name == "self":
                continue
            assert p.kind is not inspect.Parameter.VAR_KEYWORD, f"{path}.{name}: **{p.name}"
            assert p.annotation is not inspect.Parameter.empty, f"{path}.{name}: {p.name}"


def test_async_methods_are_awaitable_or_async_iterable() -> None:
    """Each async twin either is a coroutine function or hands back an async iterable."""
    for path, _, async_cls in PAIRS:
        for name, member in _public(async_cls).items():
            if isinstance(member, property):
                continue
            ret = str(inspect.signature(member).return_annotation)
            assert (
                inspect.iscoroutinefunction(member)
                or inspect.isasyncgenfunction(member)
                or ret.startswith(("AsyncIterator", "AsyncScoreStream"))
            ), f"{path}.{name}"


def _load_generator() -> Any:
    spec = importlib.util.spec_from_file_location(
        "gen_sync_client", ROOT / "scripts" / "gen_sync_client.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_sync_client_is_fresh() -> None:
    """Regenerating the blocking client from the asyncio source gives the committed file."""
    gen = _load_generator()
    committed = (ROOT / "clients" / "clinisynth" / "_sync_client.py").read_text()
    assert gen.render() == committed, "run: python scripts/gen_sync_client.py"


def test_generator_rewrites_code_not_strings() -> None:
    gen = _load_generator()
    src = (
        '"""module doc"""\n'
        "async def f(t: AsyncTransport) -> AsyncIterator[int]:\n"
        '    """Use ``async for`` and ``await`` with AsyncClient."""\n'
        "    async for x in t.stream():\n"
        "        yield await x\n"
    )
    out = gen.unasync(src)
    assert "def f(t: Transport) -> Iterator[int]:" in out
    assert '"""Use ``async for`` and ``await`` with AsyncClient."""' in out
    assert "    for x in t.stream():\n        yield x\n" in out
    assert "module doc" not in out
