"""The pure-Python parts of the Ray deployment (no Ray needed): set keys, placement, hot-set copies,
and the replicas' notice board."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from app.jobs import LoraSpec
from app.lora.registry import LoraRegistry
from app.serve.board import Board
from app.serve.routing import AffinityPlanner, base_key, copy_index, lora_set_key, slot_replica


def _touch(root, *parts):
    path = root.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def test_the_set_key_is_canonical_sorted_versioned_and_without_weights(tmp_path):
    _touch(tmp_path, "acme", "style.safetensors")
    _touch(tmp_path, "globex", "v1", "style.safetensors")
    _touch(tmp_path, "globex", "v2", "style.safetensors")
    registry = LoraRegistry(tmp_path)
    key = lora_set_key(registry, [LoraSpec("globex", 0.3), LoraSpec("acme", 0.9)])
    assert key == "acme+globex@v2"
    assert lora_set_key(registry, [LoraSpec("acme", 0.1), LoraSpec("globex", 0.7, "v2")]) == key  # latest = v2
    assert lora_set_key(registry, [LoraSpec("globex", 0.5, "v1")]) == "globex@v1"
    assert lora_set_key(registry, [LoraSpec("acme", 0.0), LoraSpec("missing", 0.5)]) == ""  # base model: anywhere
    assert lora_set_key(registry, []) == ""


def test_new_sets_are_placed_where_the_recent_traffic_is_lightest_and_stay_there():
    planner = AffinityPlanner(replicas=2, hot_share=0.9, window=100)
    slots = {key: planner.route(key)[1] for key in ("a", "a", "a", "b", "c")}
    assert slots["a"] != slots["b"]  # b goes to the empty slot
    assert slots["c"] == slots["b"]  # a carries 3 requests, b 1
    assert all(planner.route("a") == ("a", slots["a"]) for _ in range(3))  # sticky
    assert planner.route("") == ("", None)


def test_a_hot_set_gets_copies_on_other_slots_round_robin():
    planner = AffinityPlanner(replicas=3, hot_share=0.3, window=20)
    for i in range(10):
        planner.route(f"cold-{i}")
    routes = [planner.route("hot") for _ in range(10)]
    assert planner.hot_keys() == {"hot": 2}  # share 0.5 of 20 -> ceil(0.5 * 3) = 2 copies
    keys = Counter(key for key, _ in routes[-4:])
    assert set(keys) == {"hot", "hot#1"} and keys["hot"] == keys["hot#1"]
    slots = {key: slot for key, slot in routes[-4:]}
    assert slots["hot"] != slots["hot#1"]
    assert base_key("hot#1") == "hot" and copy_index("hot#1") == 1 and copy_index("hot") == 0


def test_a_set_above_one_replicas_share_is_hot_even_below_hot_share():
    planner = AffinityPlanner(replicas=8, hot_share=0.5, window=100)
    for i in range(100):
        planner.route("big" if i % 5 == 0 else f"k{i}")  # 20% > 1/8
    assert planner.copies("big") == 2  # ceil(0.2 * 8)


def test_one_replica_never_copies():
    planner = AffinityPlanner(replicas=1, hot_share=0.1, window=10)
    assert {planner.route("a") for _ in range(20)} == {("a", 0)}


def test_slots_map_to_the_sorted_live_replicas():
    assert slot_replica(0, ["r2", "r1"]) == "r1" and slot_replica(3, ["r2", "r1"]) == "r2"
    assert slot_replica(1, []) is None


def test_the_board_broadcasts_to_live_replicas_and_does_not_wait_for_dead_ones():
    async def scenario():
        board = Board(stale_s=0.5)
        await board.register("r1", {"device": "cpu"})
        await board.register("r2", {"device": "cpu"})

        async def replica(name: str, answer):
            after = 0
            commands = await board.next_commands(name, after, timeout=2)
            for command_id, command, args in commands:
                await board.reply(command_id, name, answer(command, args))

        workers = [
            asyncio.ensure_future(replica("r1", lambda c, a: f"r1:{c}:{a['x']}")),
            asyncio.ensure_future(replica("r2", lambda c, a: f"r2:{c}:{a['x']}")),
        ]
        answer = await board.broadcast("stats", {"x": 1}, timeout=2)
        await asyncio.gather(*workers)
        assert answer == {"replies": {"r1": "r1:stats:1", "r2": "r2:stats:1"}, "missing": []}
        # r2 stops polling: after stale_s it is no longer waited for.
        await asyncio.sleep(0.6)
        board._seen["r1"] = time.monotonic()  # r1 is still polling
        worker = asyncio.ensure_future(replica("r1", lambda c, a: "ok"))
        answer = await board.broadcast("stats", {"x": 2}, timeout=2)
        await worker
        assert answer == {"replies": {"r1": "ok"}, "missing": []}
        assert list(board.live()) == ["r1"]

    asyncio.run(scenario())
