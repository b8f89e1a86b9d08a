"""The pure-Python parts of the Ray deployment (no Ray needed): set keys, placement, hot-set copies,
and the replicas' notice board."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter

from app.jobs import LoraSpec
from app.lora.cache import LoraCache
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
    planner = AffinityPlanner(replicas=2, window=100)
    slots = {key: planner.route(key)[1] for key in ("a", "a", "a", "b", "c")}
    assert slots["a"] != slots["b"]  # b goes to the empty slot
    assert slots["c"] == slots["b"]  # a carries 3 requests, b 1
    assert all(planner.route("a") == ("a", slots["a"]) for _ in range(3))  # sticky
    assert planner.route("") == ("", None)


def test_a_hot_set_gets_copies_on_other_slots_round_robin():
    planner = AffinityPlanner(replicas=3, window=40)
    for i in range(20):
        planner.route(f"cold-{i}")
    routes = [planner.route("hot") for _ in range(20)]
    # Hot from its 15th request: 15/35 > (1 + 0.25) / 3; 0.5 of 40 -> ceil(0.5 * 3) = 2 copies.
    assert planner.hot_keys() == {"hot": 2}
    assert {key for key, _ in routes[:14]} == {"hot"}
    keys = Counter(key for key, _ in routes[-4:])
    assert set(keys) == {"hot", "hot#1"} and keys["hot"] == keys["hot#1"]
    slots = {key: slot for key, slot in routes[-4:]}
    assert slots["hot"] != slots["hot#1"]
    assert base_key("hot#1") == "hot" and copy_index("hot#1") == 1 and copy_index("hot") == 0


def test_a_set_above_one_replicas_share_by_the_margin_gets_copies():
    planner = AffinityPlanner(replicas=8, window=100)
    for i in range(100):
        planner.route("big" if i % 5 == 0 else f"k{i}")  # 20% > (1 + 0.25) / 8
    assert planner.copies("big") == 2  # ceil(0.2 * 8)


def test_a_set_one_replica_can_carry_never_gets_a_copy():
    """Four sets at a steady 0.25 each on 2 replicas: each rounds of the four in a shuffled order,
    so a set's share of the window jumps about (up to 6 of 20, 0.3); it never passes 1/2 + margin."""
    rng = random.Random(0)
    for window in (20, 200):
        planner = AffinityPlanner(replicas=2, window=window)
        routes = []
        for _ in range(500):
            for key in rng.sample("abcd", 4):
                routes.append(planner.route(key))
                assert planner.hot_keys() == {}
        assert {key for key, _ in routes} == set("abcd")  # no copy was ever used
        assert len({slot for _, slot in routes}) == 2 and all(
            len({slot for key, slot in routes if key == k}) == 1 for k in "abcd"
        )  # each set on one slot, the sets over both


def test_a_hot_set_keeps_its_copies_until_one_replica_can_carry_it_again():
    """Hysteresis: hot above (1 + margin) / R, cool only at 1 / R or below, so a set near the line does not flap."""
    planner = AffinityPlanner(replicas=2, window=100, hot_margin=0.25)

    def feed(share: float, n: int = 100) -> set[int]:
        copies = set()
        for i in range(n):
            hot_turn = int((i + 1) * share) > int(i * share)
            planner.route("hot" if hot_turn else f"other-{i % 7}")
            copies.add(planner.copies("hot"))
        return copies

    assert feed(0.6) == {1}  # above 1/2 but within the margin: one replica still carries it
    assert feed(0.7) >= {2}  # above 0.625: copies
    assert feed(0.55) == {2}  # between 1/2 and 0.625: it stays hot
    assert feed(0.3, 200) >= {1} and planner.copies("hot") == 1  # at 1/2 or below: back on one replica


def test_four_sets_round_robin_on_two_replicas_of_cache_two_all_hit_after_the_first_round():
    """The issue's case: 2 replicas x LORA_CACHE_MAX_SIZE 2, four LoRA sets in round robin. Routed as
    app/serve/router.py does (a replica holding the routing key first, else the slot's), every
    request after the first round finds its adapter."""
    for window in (20, 200):
        planner = AffinityPlanner(replicas=2, window=window)
        caches = [LoraCache(2), LoraCache(2)]
        outcomes = []
        for _ in range(100):
            for key in ("a", "b", "c", "d"):
                routing_key, slot = planner.route(key)
                holders = [cache for cache in caches if cache.peek(routing_key) is not None]
                cache = holders[0] if holders else caches[slot]
                hit = cache.lookup(routing_key) is not None
                if not hit:
                    cache.put(routing_key, True)
                outcomes.append(hit)
        assert outcomes[:4] == [False] * 4 and all(outcomes[4:]), outcomes.index(False, 4)


def test_one_replica_never_copies():
    planner = AffinityPlanner(replicas=1, window=10)
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


# ---- what crosses to a replica and back -------------------------------------------------------------


def test_an_outcome_crosses_the_wire_with_every_field():
    """`GenerationOutcome.to_wire`/`from_wire` (a replica's reply): every field, none left at its default."""
    import dataclasses
    import io

    from PIL import Image

    from app.jobs import AppliedLora
    from app.service import GenerationOutcome, encode_png

    @dataclasses.dataclass
    class WhereItRan(GenerationOutcome):  # as app/serve/remote.py's RemoteOutcome (which needs Ray)
        replica: str = ""

    image = Image.new("RGB", (8, 8), (200, 30, 40))
    png = encode_png(image, "a red square\nSteps: 4")
    outcome = GenerationOutcome(
        image=image, png=png, infotext="a red square\nSteps: 4", seed=1234, width=8, height=8,
        loras=[AppliedLora("acme", "v2", 0.7, "style", "acme/v2/style.safetensors", "ab" * 32)],
        warnings=["a warning"], queue_ms=1.5, lora_ms=2.5, generation_ms=3.5, total_ms=9.0, batch_size=3, stopped_at=3,
    )  # fmt: skip
    defaults = {f.name: f.default for f in dataclasses.fields(GenerationOutcome)}
    assert all(getattr(outcome, name) != default for name, default in defaults.items())  # every field set
    wire = outcome.to_wire()
    assert set(wire) == set(defaults) - {"image"} and wire["batch_size"] == 3
    back = GenerationOutcome.from_wire(wire)
    for name in defaults.keys() - {"image"}:
        assert getattr(back, name) == getattr(outcome, name), name
    assert back.image.tobytes() == image.tobytes() and back.image.size == image.size
    remote = WhereItRan.from_wire(wire, replica="r1")
    assert remote.to_wire() == {**wire, "replica": "r1"}
    assert Image.open(io.BytesIO(remote.png)).info["parameters"] == "a red square\nSteps: 4"
