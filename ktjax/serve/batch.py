"""The device side of a serving batch: the fixed decode slots' KV cache, tokens, positions, keys and
sampling settings (`DecodeBatch`), and an admission's prefill of waiting prompts into free slots,
advanced part by part (`Admission`). `ktjax.serve.scheduler` decides who takes which slot and when."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from ktjax.models import KVCache
from ktjax.runtime.generation import SamplingOptions
from ktjax.runtime.model import LoadedModel, Sampling, StepStats
from ktjax.runtime.shapes import batch_bucket, cache_length, padded_prompt_length


@functools.partial(jax.jit, donate_argnums=0)
def insert_rows(cache_B: KVCache, cache_k: KVCache, slots_k: jax.Array) -> KVCache:
    """cache_B with rows slots_k[r]'s first positions replaced by row r of a smaller cache (layers,
    k, S, dim); a slot out of range (max_batch: a padding row) is dropped."""
    def put(big, small):
        return big.at[:, slots_k, :small.shape[2]].set(small.astype(big.dtype), mode="drop")

    return jax.tree.map(put, cache_B, cache_k)


@jax.jit
def take_rows(cache_B: KVCache, keys_B: jax.Array, rows_n: jax.Array) -> tuple[KVCache, jax.Array, jax.Array]:
    """The cache of rows rows_n only (a copy: [layers, n, S, dim]), with their keys split as `split_rows`
    splits every row's: (that cache, their next keys [n], their keys for this step [n]). One program:
    each dispatch is on a serving step's path."""
    next_n, subs_n = split_rows(keys_B[rows_n])
    return jax.tree.map(lambda a: a[:, rows_n], cache_B), next_n, subs_n


@functools.partial(jax.jit, donate_argnums=(0, 1))
def put_rows(cache_B: KVCache, keys_B: jax.Array, cache_n: KVCache, keys_n: jax.Array,
             rows_n: jax.Array) -> tuple[KVCache, jax.Array]:
    """cache_B and keys_B with rows rows_n replaced by cache_n's and keys_n's (the inverse of `take_rows`)."""
    return (jax.tree.map(lambda big, small: big.at[:, rows_n].set(small), cache_B, cache_n),
            keys_B.at[rows_n].set(keys_n))


@jax.jit
def set_rows(keys_S: jax.Array, keys_B: jax.Array, rows_B: jax.Array) -> jax.Array:
    """keys_S with rows rows_B[r] set to keys_B[r] (a row out of range is dropped)."""
    return keys_S.at[rows_B].set(keys_B, mode="drop")


@jax.jit
def split_rows(keys_B: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's key split as generation splits its one key per step: (next keys, this step's)."""
    pairs_B2 = jax.vmap(jax.random.split)(keys_B)
    return pairs_B2[:, 0], pairs_B2[:, 1]


@functools.partial(jax.jit, static_argnums=2)
def advance_rows(keys_n: jax.Array, pos_n: jax.Array, max_len: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The stepping rows' keys and positions for their next step, from their last step's (the same rows
    again: nothing to upload): (next keys, this step's keys, positions one further on, as `_advance`)."""
    next_n, subs_n = split_rows(keys_n)
    return next_n, subs_n, jnp.minimum(pos_n + 1, max_len - 1)


@dataclasses.dataclass
class Stepping:
    """Rows that step in a batch of their own size (`DecodeBatch.decode`), with their cache rows, keys,
    last positions and sampled tokens held on the device, apart from the slots', until another set of
    rows steps or anything reads the slots' cache."""

    rows_n: np.ndarray  # host int32 [n]: the slots, in the order of the cache's rows
    rows: jax.Array  # the same on the device
    cache_n: KVCache
    keys_n: jax.Array
    pos_n: jax.Array  # the positions they last stepped at
    token_n: jax.Array  # what they sampled there: their next tokens


def seed_keys(opts: list[SamplingOptions]) -> tuple[jax.Array, jax.Array]:
    """Each request's keys as `ktjax.generate` splits its seed: (the key kept for decoding, the prefill
    sample's), each [k]."""
    pairs_k2 = jnp.stack([jax.random.split(jax.random.key(o.seed)) for o in opts])
    return pairs_k2[:, 0], pairs_k2[:, 1]


class DecodeBatch:
    """The device side of the slots: the batch's KV cache, each row's last token, position, key and
    sampling settings."""

    def __init__(self, model: LoadedModel, max_batch: int, max_len: int):
        self.executor = model.executor
        # The cache and keys committed to where the cache is (one device, or replicated over a mesh), as
        # every step's outputs are: a program compiled for uncommitted inputs (what `warm_up` would meet
        # first) is compiled again for committed ones, and programs taking both must find them together.
        cache = self.executor.init_cache(max_batch, max_len)
        self._place = place = jax.tree.leaves(cache)[0].sharding
        self._cache_B = jax.device_put(cache, place)
        self.token_B = np.zeros(max_batch, np.int32)
        self.pos_B = np.zeros(max_batch, np.int32)
        self._keys_B = jax.device_put(jax.random.split(jax.random.key(0), max_batch), place)
        self._stepping: Stepping | None = None  # rows whose cache and keys are out of the slots' (`decode`)
        self.last_stats = StepStats()  # the last step's, decode or admission (what moved, the host CPU's time)
        self.temperature_B = np.zeros(max_batch, np.float32)
        self.top_k_B = np.zeros(max_batch, np.int32)
        self.top_p_B = np.ones(max_batch, np.float32)
        self._sampling_cache = None  # (rows and settings, their Sampling on the device)

    @property
    def cache_B(self) -> KVCache:
        """The slots' KV cache, every row current."""
        self._put_back()
        return self._cache_B

    def _put_back(self) -> None:
        """The stepping rows' cache and keys back into the slots'."""
        if self._stepping is not None:
            st, self._stepping = self._stepping, None
            self._cache_B, self._keys_B = put_rows(self._cache_B, self._keys_B, st.cache_n, st.keys_n, st.rows)

    def prefill_into(self, slots: list[int], prompts: list[list[int]], opts: list[SamplingOptions]) -> list[int]:
        """Prefill prompts into slots at once (`start_prefill` run to its end); the first token of
        each prompt."""
        admission = self.start_prefill(slots, prompts, opts)
        while not admission.advance():
            pass
        return admission.firsts

    def start_prefill(self, slots: list[int], prompts: list[list[int]], opts: list[SamplingOptions]) -> Admission:
        """Prefill prompts together (one padded batch, a power-of-two of rows), each row sampled as
        `ktjax.generate` samples that prompt alone (its seed's first split, its settings), in the
        executor's parts (`Executor.prefill_steps`: a resident model's chunks), one per
        `Admission.advance`; the last copies row r's cache into slots[r]. Nothing runs until the
        first advance. The batch may decode its other rows between parts: the admission's own
        cache is apart until then, and the slots' rows are written only at the end."""
        k = len(prompts)
        B = batch_bucket(k)
        lengths_B = np.array([len(p) for p in prompts] + [1] * (B - k), np.int32)
        tokens_BT = np.zeros((B, padded_prompt_length(int(lengths_B.max()))), np.int32)
        for r, p in enumerate(prompts):
            tokens_BT[r, :len(p)] = p
        keys_B, subs_B = seed_keys(opts + [opts[0]] * (B - k))  # B rows: shapes depend on the bucket only
        settings = [(o.temperature, o.top_k, o.top_p) for o in opts] + [(0.0, 0, 1.0)] * (B - k)
        sampling = Sampling(jnp.asarray([t for t, _, _ in settings], jnp.float32),
                            jnp.asarray([t for _, t, _ in settings], jnp.int32),
                            jnp.asarray([t for _, _, t in settings], jnp.float32))
        # The cache holds the prompts only (their padded length); decode continues in the slots' rows.
        cache_k = self.executor.init_cache(B, cache_length(int(lengths_B.max()), 0))
        steps = self.executor.prefill_steps(cache_k, tokens_BT, lengths_B, subs_B, sampling)
        return Admission(self, list(slots), [len(p) for p in prompts], list(opts), keys_B, steps)

    def _finish_prefill(self, admission: Admission, first_B: jax.Array, cache_k: KVCache) -> list[int]:
        slots, k = admission.slots, len(admission.slots)
        B = cache_k.batch
        rows = jnp.asarray(slots + [self.token_B.shape[0]] * (B - k), jnp.int32)  # padding rows: dropped
        # The stepping rows go back first (`cache_B`): a slot taken here may have filled out their batch.
        self._cache_B = insert_rows(self.cache_B, cache_k, rows)
        self._keys_B = set_rows(self._keys_B, admission.keys_B, rows)
        first_B = np.asarray(first_B)
        for r, (slot, o) in enumerate(zip(slots, admission.opts)):
            self.token_B[slot], self.pos_B[slot] = int(first_B[r]), admission.lengths[r]
            self.temperature_B[slot], self.top_k_B[slot], self.top_p_B[slot] = o.temperature, o.top_k, o.top_p
        return [int(t) for t in first_B[:k]]

    def can_admit_while_stepping(self, prompts: list[list[int]], active_B: np.ndarray) -> bool:
        """Whether `admit_while_stepping` can take these prompts now: an executor with a ragged layer pass
        (`extend`: the offloaded one, whose every prefill streams all host experts), and room in the cache
        for the decoding rows' padded columns."""
        if not hasattr(self.executor, "extend"):
            return False
        T = padded_prompt_length(max(len(p) for p in prompts))
        S = self._cache_B.max_len
        return T <= S and int(np.max(self.pos_B[active_B], initial=0)) + T <= S

    def admit_while_stepping(self, slots: list[int], prompts: list[list[int]], opts: list[SamplingOptions],
                             active_B: np.ndarray) -> tuple[list[int], np.ndarray]:
        """One layer pass over the slots that prefills prompts into `slots` and advances the decoding rows
        (active_B) by one token, so the decoding requests do not wait for the admission (an offloaded
        prefill streams every host expert: alone, it would stall them for a whole extra pass). Each
        prompt is sampled as `start_prefill` samples it; each decoding row as `decode` advances it.
        Returns (each prompt's first token, the sampled tokens [B])."""
        self._put_back()
        B, T = len(self.token_B), padded_prompt_length(max(len(p) for p in prompts))
        tokens_BT = np.zeros((B, T), np.int32)
        tokens_BT[:, 0] = self.token_B
        active_BT = np.zeros((B, T), bool)
        active_BT[:, 0] = active_B
        start_B = np.where(active_B, self.pos_B, 0).astype(np.int32)  # free rows write from 0: always in range
        last_B = np.zeros(B, np.int32)
        keys_B, subs_B = split_rows(self._keys_B)
        temperature_B, top_k_B, top_p_B = self.temperature_B.copy(), self.top_k_B.copy(), self.top_p_B.copy()
        for slot, p, o in zip(slots, prompts, opts):
            tokens_BT[slot] = 0
            tokens_BT[slot, :len(p)] = p
            active_BT[slot, :len(p)] = True
            start_B[slot], last_B[slot] = 0, len(p) - 1
            temperature_B[slot], top_k_B[slot], top_p_B[slot] = o.temperature, o.top_k, o.top_p
        keys_k, prefill_k = seed_keys(opts)
        rows = jnp.asarray(slots, jnp.int32)
        self._keys_B = set_rows(keys_B, keys_k, rows)
        subs_B = set_rows(subs_B, prefill_k, rows)
        sampling = Sampling(jnp.asarray(temperature_B), jnp.asarray(top_k_B), jnp.asarray(top_p_B))
        sampled_B, self._cache_B, self.last_stats = self.executor.extend(self._cache_B, tokens_BT, start_B, last_B,
                                                                         active_BT, subs_B, sampling)
        sampled_B = self._advance(sampled_B)
        self.temperature_B, self.top_k_B, self.top_p_B = temperature_B, top_k_B, top_p_B
        for slot, p in zip(slots, prompts):
            self.pos_B[slot] = len(p)
        return [int(sampled_B[slot]) for slot in slots], sampled_B

    def _advance(self, sampled_B) -> np.ndarray:
        """After a step: each row's next token is what it sampled, one position further on (host arrays)."""
        sampled_B = np.asarray(sampled_B)
        self.token_B = sampled_B.astype(np.int32)
        self.pos_B = np.minimum(self.pos_B + 1, self._cache_B.max_len - 1)
        return sampled_B

    def decode(self, active_B: np.ndarray | None = None) -> np.ndarray:
        """One step of the rows in use; the sampled tokens [B] (rows not stepped keep their last token).
        Rows then sit one position further on (a free row's position is reset when a request takes it).
        active_B: the rows in use (None: all).

        While the rows in use fit a smaller power of two than the slots (`batch_bucket`), only that many
        rows step: those in use and free ones to fill the bucket, their cache rows taken out and put back
        around a step compiled for that size. A step's cost grows with its rows (attention over each
        row's cache, routing, the LM head), so one request in 32 slots would otherwise pay for 31 free
        rows (bench_serve run 10: 19.4 against 17.4 ms at batch 1). The copies are of at most half the
        cache, which fits the workspace that prefill's expanded keys and values reserve. While the same rows
        step, their cache and keys stay out (`Stepping`): a request decoding alone then costs one program
        beside the executor's per step (its key's split and position's step) instead of two and their copies,
        and no upload."""
        B = len(self.token_B)
        active_B = np.ones(B, bool) if active_B is None else np.asarray(active_B, bool)
        n = batch_bucket(max(1, int(active_B.sum())))
        if n >= B:  # every row steps, in the cache as it is
            self._put_back()
            rows_n = np.arange(B, dtype=np.int32)
            token_n, pos_n = jax.device_put((self.token_B, self.pos_B), self._place)
            self._keys_B, subs_n = split_rows(self._keys_B)
            cache_n = self._cache_B
        else:
            in_use = np.flatnonzero(active_B)
            rows_n = np.concatenate([in_use, np.flatnonzero(~active_B)[:n - len(in_use)]]).astype(np.int32)
            st = self._stepping
            if st is not None and np.array_equal(st.rows_n, rows_n):  # the same rows: their inputs are out already
                rows, cache_n, token_n = st.rows, st.cache_n, st.token_n
                keys_n, subs_n, pos_n = advance_rows(st.keys_n, st.pos_n, cache_n.max_len)
            else:
                self._put_back()
                # Committed, as the same rows' next steps find them (`advance_rows`' outputs, the step's tokens).
                rows, token_n, pos_n = jax.device_put((rows_n, self.token_B[rows_n], self.pos_B[rows_n]), self._place)
                cache_n, keys_n, subs_n = take_rows(self._cache_B, self._keys_B, rows)
            self._stepping = None  # its cache goes to the step below (donated)
        active_n = active_B[rows_n]
        sampled_n, cache_n, self.last_stats = self.executor.decode(
            cache_n, token_n, pos_n, subs_n, self._sampling(rows_n), active_B=None if active_n.all() else active_n)
        if n >= B:
            self._cache_B = cache_n
        else:
            self._stepping = Stepping(rows_n, rows, cache_n, keys_n, pos_n, sampled_n)
        sampled_B = self.token_B.copy()
        sampled_B[rows_n] = np.asarray(sampled_n)
        return self._advance(sampled_B)

    def _sampling(self, rows_n: np.ndarray) -> Sampling:
        """The rows' sampling settings on the device, uploaded again only when the rows or their settings
        change (an admission, a request leaving), not every step."""
        settings = (self.temperature_B[rows_n], self.top_k_B[rows_n], self.top_p_B[rows_n])
        key = (rows_n.tobytes(),) + tuple(a.tobytes() for a in settings)
        if self._sampling_cache is None or self._sampling_cache[0] != key:
            self._sampling_cache = (key, Sampling(*jax.device_put(settings)))
        return self._sampling_cache[1]

    def warm_up(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Compile the decode step at every size `decode` runs (each power of two up to the slots), and an
        offloaded model's programs for every split of its experts and every capacity its experts may need, in the
        fused and the streamed form, where a step takes them (`OffloadedExecutor.compile_decode`), so requests meet
        no compile there; the rows' contents are left as garbage (free rows are reset when taken). stop is asked
        before each size: True ends the warm-up there (a server's Ctrl-C, which would otherwise wait for
        every size: 39.9 s for DeepSeek-V3's layers offloaded on an H200 in serve.md's run 15, and 33.0 s after a
        signal on the dev box's embedded model at --max-batch 32). Returns whether it ran to the end."""
        B = len(self.token_B)
        sizes = sorted({batch_bucket(k) for k in range(1, B + 1)})
        for n in sizes:
            if stop():
                return False
            for _ in range(2):  # the second: the same rows again, their cache already out
                self.decode(np.arange(B) < n)
        # An offloaded step also meets programs by its routing (how many experts on each path): at 2 rows, before
        # this warmed more than one, a 4-slot batch of the embedded model compiled two mid-stream.
        for n in sizes:
            if stop():
                return False
            self.executor.compile_decode(n)
        return True


class Admission:
    """One admission's prefill in progress (`DecodeBatch.start_prefill`): `advance` runs its next
    part; `firsts` holds each prompt's first token once it is done."""

    def __init__(self, batch: DecodeBatch, slots: list[int], lengths: list[int], opts: list[SamplingOptions],
                 keys_B: jax.Array, steps):
        self.batch, self.slots, self.lengths, self.opts, self.keys_B = batch, slots, lengths, opts, keys_B
        self._steps = steps
        self.parts = 0  # parts run so far
        self.firsts: list[int] | None = None

    @property
    def done(self) -> bool:
        return self.firsts is not None

    def advance(self) -> bool:
        """Run the next part of the prefill; True once the last has run and the slots hold its rows."""
        if self.done:
            return True
        self.parts += 1
        try:
            next(self._steps)
            return False
        except StopIteration as end:
            first_B, cache_k, _ = end.value
        self._steps = None
        self.firsts = self.batch._finish_prefill(self, first_B, cache_k)
        return True
