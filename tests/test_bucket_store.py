"""Time buckets in the database layer, engine by engine: every bucket equals the sum of the deltas
counted in it, however batches fall across buckets, late or out of order, with idempotent
batches applied twice, with overflow, and after the retention sweep."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from support import unique

from incrementer.store import INT64_MAX, INT64_MIN, Store
from incrementer.store.base import IdempotentBatch, Window
from incrementer.store.buckets import Buckets, fold, taken_back, uniform
from incrementer.store.postgres_buckets import FOLD_ON_THREAD
from incrementer.store.sqlite_buckets import READ_CHUNK

MINUTE, HOUR, DAY = 60, 3600, 86400
ALL = (MINUTE, HOUR, DAY)
T0 = 1_796_515_200  # 2026-12-06T00:00:00Z, a day's start

Oracle = dict[tuple[str, int, int], int]


def count(oracle: Oracle, deltas: dict[int, dict[str, int]], lengths: tuple[int, ...]) -> None:
    """What an independent count of the same deltas says each bucket holds."""
    for finest, per_key in deltas.items():
        for key, delta in per_key.items():
            for length in lengths:
                oracle[(key, length, finest - finest % length)] += delta


async def stored(store: Store, key: str, length: int, node: str) -> dict[int, int]:
    """The key's buckets of that length over two days around T0, nonzero ones only."""
    read = await store.read_series(key, Window(length, T0 - DAY, T0 + 2 * DAY), node)
    return {start: value for start, value in read.stored.points().items() if value}


async def check(store: Store, oracle: Oracle, keys: list[str], lengths: tuple[int, ...]) -> None:
    node = unique()
    for key in keys:
        for length in lengths:
            expected = {s: v for (k, g, s), v in oracle.items() if k == key and g == length and v}
            assert await stored(store, key, length, node) == expected, (key, length)


def totals_of(deltas: dict[int, dict[str, int]]) -> dict[str, int]:
    totals: dict[str, int] = defaultdict(int)
    for per_key in deltas.values():
        for key, delta in per_key.items():
            totals[key] += delta
    return dict(totals)


async def test_random_batches_land_in_the_buckets_an_oracle_counts(store: Store) -> None:
    """Batches within one minute (the uniform upsert), across boundaries, with late deltas for
    earlier buckets and from two nodes with different clocks: every bucket of every key equals
    an independent count, and each key's buckets of a granularity sum to its total."""
    rng = random.Random(7)
    keys = [unique("b") for _ in range(12)]
    oracle: Oracle = defaultdict(int)
    nodes = [unique(), unique()]
    seqs = [0, 0]
    for n in range(40):
        node = n % 2
        minute = T0 + 60 * rng.randrange(0, 36 * 60)  # over a day and a half
        if rng.random() < 0.4:
            starts = [minute]  # one bucket, every key's whole delta in it: the uniform upsert
        else:
            starts = [minute - 60 * rng.randrange(0, 200) for _ in range(rng.randrange(1, 4))]
        deltas: dict[int, dict[str, int]] = {}
        for start in starts:
            chosen = rng.sample(keys, rng.randrange(1, len(keys)))
            deltas.setdefault(start, {}).update({k: rng.randrange(1, 50) for k in chosen})
        totals = totals_of(deltas)
        if len(deltas) == 1:
            assert uniform(totals, Buckets(ALL, deltas)) == starts[0]
        seqs[node] += 1
        result = await store.apply_batch(nodes[node], seqs[node], totals, (), Buckets(ALL, deltas))
        assert result.applied
        count(oracle, deltas, ALL)
    await check(store, oracle, keys, ALL)
    for key in keys:
        total = (await store.read(key, nodes[0])).value
        for length in ALL:
            assert sum((await stored(store, key, length, nodes[0])).values()) == total


async def test_totals_counted_with_buckets_off_are_in_no_bucket(store: Store) -> None:
    """A total whose delta holds increments counted with buckets off (an old WAL replayed) adds
    to the total only; the buckets hold what was counted in them."""
    node, key = unique(), unique()
    deltas = {T0: {key: 3}}
    await store.apply_batch(node, 1, {key: 10}, (), Buckets(ALL, deltas))
    assert (await store.read(key, node)).value == 10
    assert await stored(store, key, MINUTE, node) == {T0: 3}


async def test_bucket_deltas_with_no_granularity_kept_add_to_the_total_only(store: Store) -> None:
    """A flush handing bucket deltas but no granularity to keep them in writes the totals and
    no bucket at all."""
    node, key = unique(), unique()
    await store.apply_batch(node, 1, {key: 5}, (), Buckets((), {T0: {key: 5}}))
    assert (await store.read(key, node)).value == 5
    for length in ALL:
        assert await stored(store, key, length, node) == {}


async def test_only_the_kept_granularities_are_written(store: Store) -> None:
    """With --buckets hour, no minute or day bucket is written."""
    node, key = unique(), unique()
    await store.apply_batch(node, 1, {key: 5}, (), Buckets((HOUR,), {T0 + 3600: {key: 5}}))
    assert await stored(store, key, HOUR, node) == {T0 + 3600: 5}
    assert await stored(store, key, MINUTE, node) == {}
    assert await stored(store, key, DAY, node) == {}


async def test_an_idempotent_batch_applied_twice_counts_once_in_every_bucket(
    store: Store,
) -> None:
    """The same keyed batch flushed by two nodes, in different buckets on each (their clocks
    differ): the copy that commits second is taken back out of its buckets too."""
    a, b = unique(), unique()
    key, other = unique(), unique()
    digest = "ab" * 32
    first = IdempotentBatch(unique("ik"), digest, {key: 4}, {T0: {key: 4}})
    again = IdempotentBatch(first.key, digest, {key: 4}, {T0 + 120: {key: 4}})
    await store.apply_batch(a, 1, {key: 4}, [first], Buckets(ALL, {T0: {key: 4}}))
    result = await store.apply_batch(
        b, 1, {key: 4, other: 1}, [again], Buckets(ALL, {T0 + 120: {key: 4, other: 1}})
    )
    assert result.duplicates == {first.key: digest}
    assert (await store.read(key, a)).value == 4
    assert await stored(store, key, MINUTE, a) == {T0: 4}
    assert await stored(store, key, DAY, a) == {T0: 4}
    assert await stored(store, other, MINUTE, a) == {T0 + 120: 1}


async def test_a_key_that_would_overflow_counts_in_no_bucket(store: Store) -> None:
    """A delta set aside for overflow is in none of the key's buckets: they still sum to the
    in-range value."""
    node, key, fine = unique(), unique(), unique()
    await store.apply_batch(
        node, 1, {key: INT64_MAX - 1}, (), Buckets(ALL, {T0: {key: INT64_MAX - 1}})
    )
    result = await store.apply_batch(
        node, 2, {key: 5, fine: 1}, (), Buckets(ALL, {T0 + 60: {key: 5, fine: 1}})
    )
    assert result.overflowed == {key: 5}
    assert await stored(store, key, MINUTE, node) == {T0: INT64_MAX - 1}
    assert await stored(store, fine, MINUTE, node) == {T0 + 60: 1}


async def test_a_bucket_that_would_overflow_isolates_its_key(store: Store) -> None:
    """With negative deltas a bucket can leave 64 bits while the total does not: the key's
    delta goes to counter_overflows instead, its buckets unchanged, the others applied."""
    node, key, fine = unique(), unique(), unique()
    await store.apply_batch(node, 1, {key: INT64_MAX}, (), Buckets(ALL, {T0: {key: INT64_MAX}}))
    await store.apply_batch(node, 2, {key: -10}, (), Buckets(ALL, {T0 + 60: {key: -10}}))
    # +5 in T0's day bucket (INT64_MAX already) and -5 in a minute of it: the total is fine.
    deltas = {T0: {key: 5}, T0 + 120: {key: -5, fine: 2}}
    result = await store.apply_batch(node, 3, {key: 0, fine: 2}, (), Buckets(ALL, deltas))
    assert key in result.overflowed
    assert (await store.read(key, node)).value == INT64_MAX - 10
    assert await stored(store, key, DAY, node) == {T0: INT64_MAX - 10}
    assert await stored(store, fine, DAY, node) == {T0: 2}


async def test_a_total_that_would_overflow_isolates_its_key_whose_buckets_would_not(
    store: Store,
) -> None:
    """A key whose total would leave 64 bits while its buckets stay in range (its big count is in
    a bucket long gone) is isolated by its total; new keys of INT64_MAX and INT64_MIN in the
    same batch and a small one are applied, buckets and all."""
    node, key, big, low, fine = unique(), unique(), unique(), unique(), unique()
    old = T0 - 400 * DAY
    await store.apply_batch(
        node, 1, {key: INT64_MAX - 1}, (), Buckets(ALL, {old: {key: INT64_MAX - 1}})
    )
    deltas = {T0: {key: 5, big: INT64_MAX, low: INT64_MIN, fine: 1}}
    result = await store.apply_batch(node, 2, totals_of(deltas), (), Buckets(ALL, deltas))
    assert result.overflowed == {key: 5}
    assert (await store.read(key, node)).value == INT64_MAX - 1
    assert (await store.read(big, node)).value == INT64_MAX
    assert (await store.read(low, node)).value == INT64_MIN
    assert await stored(store, key, MINUTE, node) == {old: INT64_MAX - 1}  # nothing at T0
    assert await stored(store, big, DAY, node) == {T0: INT64_MAX}
    assert await stored(store, fine, MINUTE, node) == {T0: 1}


async def test_a_current_bucket_that_would_overflow_isolates_its_key(store: Store) -> None:
    """A key's current bucket (the one its row holds) would leave 64 bits while its total would
    not (a late negative delta went to an earlier day): the key is isolated, its buckets and
    total unchanged, and the others in the batch applied."""
    node, key, fine = unique(), unique(), unique()
    await store.apply_batch(node, 1, {key: INT64_MAX}, (), Buckets(ALL, {T0: {key: INT64_MAX}}))
    late = {T0 - DAY: {key: -10}}
    await store.apply_batch(node, 2, totals_of(late), (), Buckets(ALL, late))
    deltas = {T0 + 30: {key: 5, fine: 2}}
    result = await store.apply_batch(node, 3, totals_of(deltas), (), Buckets(ALL, deltas))
    assert result.overflowed == {key: 5}
    assert (await store.read(key, node)).value == INT64_MAX - 10
    assert await stored(store, key, MINUTE, node) == {T0 - DAY: -10, T0: INT64_MAX}
    assert await stored(store, key, DAY, node) == {T0 - DAY: -10, T0: INT64_MAX}
    assert await stored(store, fine, MINUTE, node) == {T0: 2}


async def test_the_sweep_deletes_expired_buckets_in_bounded_deletes(store: Store) -> None:
    """sweep_buckets deletes at most its limit, only the granularity and the age asked for."""
    node, key = unique(), unique()
    old = T0 - 400 * DAY  # older than any other test's buckets: only this test's rows go
    for minute in range(7):  # each batch rolls the previous minute out of the row
        start = old + 60 * minute
        await store.apply_batch(
            node, minute + 1, {key: 1}, (), Buckets((MINUTE, HOUR), {start: {key: 1}})
        )
    window = Window(MINUTE, old, old + HOUR)
    assert len((await store.read_series(key, window, node)).stored.points()) == 7
    before = old + 5 * 60
    assert await store.sweep_buckets(MINUTE, before, 2) == 2
    assert await store.sweep_buckets(MINUTE, before, 100) == 3
    assert await store.sweep_buckets(MINUTE, before, 100) == 0
    assert sorted((await store.read_series(key, window, node)).stored.points()) == [
        old + 300,
        old + 360,
    ]
    hours = await store.read_series(key, Window(HOUR, old, old + DAY), node)
    assert hours.stored.points() == {old: 7}


async def test_many_keys_are_read_in_one_snapshot_with_their_windows(store: Store) -> None:
    """read_many returns each key's total and overflow, and with a window its stored buckets;
    an unknown key reads as None."""
    node, a, b = unique(), unique(), unique()
    await store.apply_batch(node, 1, {a: 2, b: 3}, (), Buckets(ALL, {T0: {a: 2, b: 3}}))
    await store.apply_batch(node, 2, {a: 4}, (), Buckets(ALL, {T0 + HOUR: {a: 4}}))
    missing = unique()
    read = await store.read_many([a, b, missing], node)
    assert read.applied_seq == 2
    assert read.values == {a: (6, 0), b: (3, 0), missing: (None, 0)}
    windowed = await store.read_many([a, b], node, Window(HOUR, T0, T0 + DAY))
    assert windowed.windows[a].points() == {T0: 2, T0 + HOUR: 4}
    assert windowed.windows[b].points() == {T0: 3}


async def test_top_ranks_a_prefix_and_says_how_many_it_looked_at(store: Store) -> None:
    """top_keys returns the highest values under the prefix, ties by key, and counts up to
    scan + 1 keys, so a caller can tell a prefix broader than it wants to rank."""
    node, base = unique(), unique()
    values = {f"{base}a": 5, f"{base}b": 9, f"{base}c": 5, f"{base}d": 1}
    await store.apply_batch(node, 1, values)
    rows, seen = await store.top_keys(base, 3, 10)
    assert rows == [(f"{base}b", 9), (f"{base}a", 5), (f"{base}c", 5)]
    assert seen == 4
    assert (await store.top_keys(base, 3, 2))[1] == 3


@pytest.mark.parametrize("layout", ["minute-first", "day-first"])
def test_fold_adds_rolls_and_sets_aside_late_deltas(layout: str) -> None:
    """The rule both engines follow: a delta for the kept bucket adds to it, a later one rolls
    it to counter_buckets, an earlier one goes to counter_buckets directly."""
    lengths = (MINUTE, DAY)
    current = {"k": [(T0 + 60, 10), (T0, 10)]}
    deltas = {T0: {"k": 1}, T0 + 60: {"k": 2}, T0 + 120: {"k": 3}}
    if layout == "day-first":
        deltas = dict(reversed(list(deltas.items())))  # the order of the mapping does not matter
    folded = fold(lengths, current, deltas)
    assert folded.inline == {"k": [(T0 + 120, 3), (T0, 16)]}
    assert folded.cells == {("k", MINUTE, T0): 1, ("k", MINUTE, T0 + 60): 12}


async def test_keys_holding_the_separator_take_the_array_form(store: Store) -> None:
    """A key holding the joined texts' separator (written by something other than the API)
    goes as arrays, in a batch within one bucket and in one across buckets alike."""
    node = unique()
    odd, plain = unique("a\x1fb"), unique()
    deltas = {T0: {odd: 2, plain: 1}}
    await store.apply_batch(node, 1, {odd: 2, plain: 1}, (), Buckets(ALL, deltas))
    across = {T0 + 60: {odd: 3}, T0 + 120: {odd: 4, plain: 1}}
    await store.apply_batch(node, 2, {odd: 7, plain: 1}, (), Buckets(ALL, across))
    assert await stored(store, odd, MINUTE, node) == {T0: 2, T0 + 60: 3, T0 + 120: 4}
    assert await stored(store, plain, HOUR, node) == {T0: 2}
    assert (await store.read(odd, node)).value == 9


def test_taken_back_subtracts_each_lost_batch_bucket_by_bucket() -> None:
    """The deltas of idempotent batches applied before come out of the flush's buckets one by
    one: a bucket the flush lacks is skipped (not the rest of that batch), a key the bucket
    lacks goes negative, a key or bucket left at zero goes, and the input is not changed."""
    deltas = {1: {"a": 5, "b": 2}, 2: {"a": 1}, 3: {"c": 4}}
    lost = [{9: {"a": 1}, 1: {"a": 2, "b": 2}}, {2: {"a": 1}, 1: {"d": 3, "e": 0}}, {3: {"c": 1}}]
    assert taken_back(deltas, lost) == {1: {"a": 3, "d": -3}, 3: {"c": 3}}
    assert deltas == {1: {"a": 5, "b": 2}, 2: {"a": 1}, 3: {"c": 4}}


async def test_reads_say_the_nodes_applied_seq_the_overflow_and_an_unknown_key(
    store: Store,
) -> None:
    """read_many and read_series, with and without a window: each key's total and overflowed
    deltas (those of a key with no total too), None for a key never written, and the asking
    node's applied_seq (0 for a node that never flushed)."""
    node, key, full, lone, missing = unique(), unique(), unique(), unique(), unique()
    await store.apply_batch(node, 1, {key: 4, full: INT64_MAX}, (), Buckets(ALL, {T0: {key: 4}}))
    out = {full: 5, lone: INT64_MAX + 1}  # lone: a key whose only delta is out of range
    assert (await store.apply_batch(node, 2, out)).overflowed == out
    window = Window(MINUTE, T0 - HOUR, T0 + HOUR)
    for read in (
        await store.read_many([key, full, lone, missing], node),
        await store.read_many([key, full, lone, missing], node, window),
    ):
        assert read.applied_seq == 2
        assert read.values == {
            key: (4, 0),
            full: (INT64_MAX, 5),
            lone: (None, INT64_MAX + 1),
            missing: (None, 0),
        }
    assert (await store.read_many([key], unique())).applied_seq == 0
    series = await store.read_series(key, window, node)
    assert (series.value, series.applied_seq, series.stored.points()) == (4, 2, {T0: 4})
    unknown = await store.read_series(missing, window, unique())
    assert (unknown.value, unknown.applied_seq, unknown.stored.points()) == (None, 0, {})


async def test_a_flush_of_many_keys_across_buckets_lands_whole(store: Store) -> None:
    """More keys than are folded on the event loop (FOLD_ON_THREAD), each with deltas in two
    minutes: every key's total and both of its minute buckets land; a second flush in the next
    minute, of more keys than SQLite reads in two statements, rolls each one's current minute."""
    node = unique()
    keys = [unique("many") for _ in range(FOLD_ON_THREAD + 10)]
    deltas = {T0: dict.fromkeys(keys, 2), T0 + 60: dict.fromkeys(keys, 3)}
    await store.apply_batch(node, 1, totals_of(deltas), (), Buckets(ALL, deltas))
    read = await store.read_many(keys, node, Window(MINUTE, T0, T0 + 120))
    assert read.values == dict.fromkeys(keys, (5, 0))
    points = {k: w.points() for k, w in read.windows.items()}
    assert points == {k: {T0: 2, T0 + 60: 3} for k in keys}
    rolling = keys[: 2 * READ_CHUNK + 10]  # more than SQLite reads in two statements
    later = {T0 + 120: dict.fromkeys(rolling, 4)}
    await store.apply_batch(node, 2, totals_of(later), (), Buckets(ALL, later))
    read = await store.read_many(rolling, node, Window(MINUTE, T0, T0 + 180))
    points = {k: w.points() for k, w in read.windows.items()}
    assert points == {k: {T0: 2, T0 + 60: 3, T0 + 120: 4} for k in rolling}


async def test_a_bucket_delta_that_alone_leaves_64_bits_isolates_its_key(store: Store) -> None:
    """A key whose total is in range but one of whose minutes alone is not (a huge count and a
    correction in the next minute): its delta goes to counter_overflows, none of its buckets
    move, and the other keys of the batch land."""
    node, key, fine = unique(), unique(), unique()
    deltas = {T0: {key: INT64_MAX + 1, fine: 1}, T0 + 60: {key: -10}}
    result = await store.apply_batch(node, 1, totals_of(deltas), (), Buckets(ALL, deltas))
    assert result.overflowed == {key: INT64_MAX - 9}
    assert (await store.read(key, node)).value is None
    assert await stored(store, key, MINUTE, node) == {}
    assert await stored(store, fine, MINUTE, node) == {T0: 1}


async def test_a_key_whose_total_is_taken_back_keeps_its_other_bucket_deltas(
    store: Store,
) -> None:
    """A key whose only net delta in a flush is an idempotent batch applied before, beside a
    correction that cancels across two minutes (+3 then -3): its total is left alone, and the
    correction still lands minute by minute, while the hour and the day it falls in are
    unchanged. Another key in the batch has a total and no bucket deltas (counted with buckets
    off): it gets its total and no bucket."""
    a, b, key, plain = unique(), unique(), unique(), unique()
    digest = "cd" * 32
    first = IdempotentBatch(unique("ik"), digest, {key: 4}, {T0 + 120: {key: 4}})
    await store.apply_batch(a, 1, {key: 4}, [first], Buckets(ALL, {T0 + 120: {key: 4}}))
    again = IdempotentBatch(first.key, digest, {key: 4}, {T0 + 120: {key: 4}})
    deltas = {T0: {key: 3}, T0 + 60: {key: -3}, T0 + 120: {key: 4}}
    totals = totals_of(deltas) | {plain: 2}
    result = await store.apply_batch(b, 1, totals, [again], Buckets(ALL, deltas))
    assert result.duplicates == {first.key: digest}
    assert (await store.read(key, a)).value == 4
    assert (await store.read(plain, a)).value == 2
    assert await stored(store, plain, MINUTE, a) == {}
    assert await stored(store, key, MINUTE, a) == {T0: 3, T0 + 60: -3, T0 + 120: 4}
    assert await stored(store, key, HOUR, a) == {T0: 4}
    assert await stored(store, key, DAY, a) == {T0: 4}


async def test_late_deltas_that_cancel_within_an_older_bucket_leave_it_unwritten(
    store: Store,
) -> None:
    """Two late deltas for one older hour that sum to zero within a flush (+5 and -5 in two of
    its minutes): the minutes hold them, the hour holds nothing, and the current buckets roll
    on as usual."""
    node, key = unique(), unique()
    now = T0 + 2 * HOUR
    await store.apply_batch(node, 1, {key: 1}, (), Buckets(ALL, {now: {key: 1}}))
    deltas = {T0 + 600: {key: 5}, T0 + 1200: {key: -5}, now: {key: 1}}
    await store.apply_batch(node, 2, totals_of(deltas), (), Buckets(ALL, deltas))
    assert (await store.read(key, node)).value == 2
    assert await stored(store, key, MINUTE, node) == {T0 + 600: 5, T0 + 1200: -5, now: 2}
    assert await stored(store, key, HOUR, node) == {now: 2}
    assert await stored(store, key, DAY, node) == {T0: 2}


@pytest.mark.parametrize(
    ("lengths", "step"), [((MINUTE, HOUR), MINUTE), (ALL, HOUR)], ids=["hour", "day"]
)
async def test_a_coarser_current_bucket_that_would_overflow_alone_isolates_its_key(
    store: Store, lengths: tuple[int, ...], step: int
) -> None:
    """The key's current hour (or day) would leave 64 bits while its finer buckets roll on and
    its total fits (a negative delta a day before): the key is isolated, every bucket and the
    total unchanged, and the other keys of the batch land, a key counted only with buckets
    off until now (no inline bucket yet) among them."""
    node, key, fine, plain = unique(), unique(), unique(), unique()
    await store.apply_batch(node, 1, {plain: 1})
    for seq, deltas in enumerate(({T0 - DAY: {key: -100}}, {T0: {key: INT64_MAX - 10}}), 2):
        await store.apply_batch(node, seq, totals_of(deltas), (), Buckets(lengths, deltas))
    deltas = {T0 + step: {key: 50, fine: 2, plain: 3}}
    result = await store.apply_batch(node, 4, totals_of(deltas), (), Buckets(lengths, deltas))
    assert result.overflowed == {key: 50}
    assert (await store.read(key, node)).value == INT64_MAX - 110
    for length in lengths:
        assert await stored(store, key, length, node) == {T0 - DAY: -100, T0: INT64_MAX - 10}
    assert await stored(store, fine, lengths[-1], node) == {T0: 2}
    assert (await store.read(plain, node)).value == 4
    assert await stored(store, plain, lengths[0], node) == {T0 + step: 3}


async def test_a_current_bucket_and_an_older_one_overflowing_in_one_flush_isolate_both_keys(
    store: Store,
) -> None:
    """One key whose current day would leave 64 bits and another whose older minute would, in
    the same flush: both are isolated, neither's buckets move, the third key lands."""
    node, current, older, fine = unique(), unique(), unique(), unique()
    setup = {T0 - DAY: {current: -100}, T0: {older: INT64_MAX}}
    await store.apply_batch(node, 1, totals_of(setup), (), Buckets(ALL, setup))
    setup = {T0: {current: INT64_MAX - 10}, T0 + HOUR: {older: -10}}
    await store.apply_batch(node, 2, totals_of(setup), (), Buckets(ALL, setup))
    deltas = {T0: {older: 5}, T0 + HOUR: {current: 50, fine: 2}}
    result = await store.apply_batch(node, 3, totals_of(deltas), (), Buckets(ALL, deltas))
    assert result.overflowed == {current: 50, older: 5}
    assert await stored(store, current, DAY, node) == {T0 - DAY: -100, T0: INT64_MAX - 10}
    assert await stored(store, older, MINUTE, node) == {T0: INT64_MAX, T0 + HOUR: -10}
    assert await stored(store, fine, MINUTE, node) == {T0 + HOUR: 2}


async def test_a_flush_whose_every_delta_was_applied_before_writes_nothing(store: Store) -> None:
    """A flush holding only an idempotent batch across two minutes that another node applied
    first: all of it is taken back, nothing is written, and the first copy stands."""
    a, b, key = unique(), unique(), unique()
    digest = "ef" * 32
    deltas = {T0: {key: 2}, T0 + 60: {key: 3}}
    first = IdempotentBatch(unique("ik"), digest, {key: 5}, deltas)
    await store.apply_batch(a, 1, {key: 5}, [first], Buckets(ALL, deltas))
    again = IdempotentBatch(first.key, digest, {key: 5}, deltas)
    result = await store.apply_batch(b, 1, {key: 5}, [again], Buckets(ALL, deltas))
    assert (result.applied, result.duplicates, result.overflowed) == (
        True, {first.key: digest}, {},
    )  # fmt: skip
    assert (await store.read(key, a)).value == 5
    assert await stored(store, key, MINUTE, a) == {T0: 2, T0 + 60: 3}


async def test_a_current_bucket_that_summed_to_zero_rolls_to_nothing(store: Store) -> None:
    """A key's current minute brought back to zero (+3, then -3 in the next flush) rolls into
    no counter_buckets row when the next minute starts: the series shows only the new minute,
    and the hour still holds the 1."""
    node, key = unique(), unique()
    for seq, deltas in enumerate(({T0: {key: 3}}, {T0: {key: -3}}, {T0 + 60: {key: 1}}), 1):
        await store.apply_batch(node, seq, totals_of(deltas), (), Buckets(ALL, deltas))
    assert await stored(store, key, MINUTE, node) == {T0 + 60: 1}
    assert await stored(store, key, HOUR, node) == {T0: 1}
    assert (await store.read(key, node)).value == 1
