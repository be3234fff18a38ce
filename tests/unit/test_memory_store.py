"""Tests of the in-memory device store."""

from __future__ import annotations

import threading

import pytest
import torch

from consumer.store.base import StoredObject, StoredPlan
from consumer.store.memory import MemoryStore
from schemas.errors import ObjectNotFound
from schemas.ir import PlanIR, Ref


def _plan(plan_id: str) -> StoredPlan:
    ir = PlanIR(name="identity", inputs=(Ref(0),), ops=[], outputs=Ref(0), num_slots=1)
    return StoredPlan(plan_id, ir, content_hash="h")


def test_a_stored_object_comes_back_with_its_tags_and_description() -> None:
    store = MemoryStore()
    store.put_object(StoredObject("a", torch.tensor([1.0, 2.0]), ("x", "y"), "demo"))
    got = store.get_object("a")
    assert torch.equal(got.tensor, torch.tensor([1.0, 2.0]))
    assert (got.tags, got.description) == (("x", "y"), "demo")
    assert store.has_object("a")


def test_getting_or_deleting_a_missing_object_raises_object_not_found() -> None:
    store = MemoryStore()
    with pytest.raises(ObjectNotFound):
        store.get_object("nope")
    with pytest.raises(ObjectNotFound):
        store.delete_object("nope")


def test_search_returns_only_objects_carrying_every_tag() -> None:
    store = MemoryStore()
    store.put_object(StoredObject("a", torch.zeros(1), ("input", "train")))
    store.put_object(StoredObject("b", torch.zeros(1), ("input",)))
    store.put_object(StoredObject("c", torch.zeros(1), ("train",)))
    assert [o.id for o in store.search(["input", "train"])] == ["a"]
    assert sorted(o.id for o in store.search(["input"])) == ["a", "b"]
    assert store.search(["absent"]) == []


def test_clear_objects_removes_objects_but_keeps_plans() -> None:
    store = MemoryStore()
    store.put_object(StoredObject("a", torch.zeros(1)))
    store.put_plan(_plan("p"))
    store.clear_objects()
    assert store.list_objects() == []
    assert store.has_plan("p")


def test_a_missing_plan_raises_object_not_found_naming_the_plan() -> None:
    store = MemoryStore()
    with pytest.raises(ObjectNotFound) as info:
        store.get_plan("p9")
    assert info.value.plan_id == "p9"


def test_deleted_plans_are_gone() -> None:
    store = MemoryStore()
    store.put_plan(_plan("p"))
    store.delete_plan("p")
    assert not store.has_plan("p")


def test_replies_are_remembered_by_command_id_up_to_the_limit() -> None:
    store = MemoryStore(max_replies=2)
    for i in range(3):
        store.put_reply(f"c{i}", [], f"reply{i}".encode())
    assert store.get_reply("c0") is None
    assert store.get_reply("c2") == b"reply2"


def test_concurrent_writers_lose_no_objects() -> None:
    store = MemoryStore()

    def write(prefix: str) -> None:
        for i in range(200):
            store.put_object(StoredObject(f"{prefix}{i}", torch.zeros(1)))

    threads = [threading.Thread(target=write, args=(p,)) for p in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(store.list_objects()) == 800
