"""torch.distributed calibration and OBS database (gloo, 2 processes on the CPU, tiny random LLaMA).

The Hessians are sums of xxᵀ, so a data-parallel calibration is exact up to the order of the float64
additions: the reduced Hessian is the sum of the shards' Hessians bit for bit, token counts are
exact, and the database (removal orders, losses, weights) matches one process; a rank with an empty
shard adds zeros, so that case is bit-identical. The layer solves are independent (the database's
inputs are dense-propagated, ZipLM paper: layer-wise OBS on the dense model's activations), so they
can run on any rank; every rank ends with the same database.

One spawn of 2 workers runs every distributed scenario and saves what it saw; the tests compare
that with single-process runs in this process.
"""
from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from ziplm_ext import dist as zdist
from ziplm_ext.adapters import get_adapter
from ziplm_ext.config import CalibrationConfig, MeasureConfig, PruneConfig, SearchConfig
from ziplm_ext.env import InferenceEnv
from ziplm_ext.stages.calibrate import block_hessians, make_batches, reduced_block_hessians
from ziplm_ext.stages.database import build_database, solve_owners
from ziplm_ext.stages.latency.table import LatencyTable
from ziplm_ext.stages.levels import layer_grid

WORLD = 2
ENV = InferenceEnv(seq_len=16)
pytestmark = pytest.mark.skipif(not zdist.dist.is_available() or not zdist.dist.is_gloo_available(),
                                reason="needs torch.distributed with the gloo backend")


def tiny_llama(seed=0, layers=2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).eval()


def ids(n, T=16, seed=1):
    return torch.randint(0, 128, (n, T), generator=torch.Generator().manual_seed(seed))


def padded(n=5, T=16, seed=3):
    """Ids with right padding of random length (at least one real token per row)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    mask = (torch.arange(T)[None, :] < lengths[:, None]).long()
    return ids(n, T, seed), mask


def synthetic_table(model):
    """Times proportional to the kept width on the level grid; the unprunable part is fixed."""
    rows = {}
    for l in get_adapter(model).prunable_layers(model):
        full = 0.1 if l.kind == "attn" else 0.15
        rows[l.name] = {c: full * c / l.num_structures for c in set(layer_grid(l)) | {0, l.num_structures}}
    prunable = sum(max(r.values()) for r in rows.values())
    return LatencyTable(env=ENV, dense_time=2.0 * prunable, prunable_time=prunable, layer_times=rows)


def family_config():
    return PruneConfig(seed=0, progress=False, baselines=(), search=SearchConfig(spdy_evaluations=6),
                       measure=MeasureConfig(measure=False), calibration=CalibrationConfig(damp=0.01, loss_blocks=2))


def snapshot(db) -> dict:
    """Every entry's history tensors and dense error, plus the weights at every grid level."""
    out = {}
    for n in db.names():
        e = db[n]
        h = e.history
        out[n] = dict(order=h.order.clone(), losses=h.losses.clone(), U=h.U.clone(), R=h.R.clone(), W0=h.W0.clone(),
                      damp=h.damp, dense_error=e.dense_error, errors=list(e.errors),
                      weights={c: db.weights(n, c).clone() for c in e.grid})
    return out


# ----------------------------------------------------------------------------- the workers


def _scenarios(rank: int, workdir: Path) -> dict:
    out = {}
    # reduction of hand-made Hessians: uneven counts, and a rank that holds no tokens
    g = torch.Generator().manual_seed(10 + rank)
    X = torch.randn(7 if rank == 0 else 3, 5, dtype=torch.float64, generator=g)
    out["local_H"] = X.T @ X
    out["reduced"] = zdist.reduce_hessian((X.T @ X).clone(), X.shape[0], dst=1)
    out["reduced_empty"] = zdist.reduce_hessian(torch.zeros(5, 5, dtype=torch.float64) if rank else (X.T @ X),
                                               0 if rank else X.shape[0], dst=0)
    # calibration with padding: 3 batches -> shards of 2 and 1 batches
    model = tiny_llama()
    layers = get_adapter(model).prunable_layers(model)
    owners = solve_owners(layers, WORLD)
    out["owners"] = owners
    x, mask = padded()
    batches = make_batches(x, mask, 2)
    out["local_calib"] = {i: (H, n) for i, H, n in block_hessians(model, zdist.shard_of(batches))}
    out["reduced_calib"] = {i: (H, n) for i, H, n in reduced_block_hessians(model, batches, owners)}
    # database, uneven shards (2 and 1 batches), shared workdir
    out["workdir"] = str(workdir / "wd")
    out["db_uneven"] = snapshot(build_database(model, make_batches(ids(6), None, 2), workdir=workdir / "wd",
                                               progress=False))
    # resume: one entry removed, the others must be loaded and not rewritten
    zdist.barrier()
    db_dir = workdir / "wd" / "database"
    if rank == 0:
        (db_dir / "blocks.1.ffn.pt").unlink()
    zdist.barrier()
    stamps = {p.name: p.stat().st_mtime_ns for p in db_dir.glob("*.pt")}
    out["db_resumed"] = snapshot(build_database(model, make_batches(ids(6), None, 2), workdir=workdir / "wd",
                                                progress=False))
    out["untouched"] = all(p.stat().st_mtime_ns == stamps[p.name] for p in db_dir.glob("*.pt") if p.name in stamps)
    out["rebuilt"] = (db_dir / "blocks.1.ffn.pt").exists()
    # database, rank 1 holds no data (one batch)
    out["db_empty_rank"] = snapshot(build_database(model, make_batches(ids(2), None, 2), progress=False))
    # ranks that loaded different weights: one clear error on every rank, before any work
    try:
        build_database(tiny_llama(seed=rank), make_batches(ids(2), None, 2), progress=False)
        out["mismatch"] = None
    except ValueError as e:
        out["mismatch"] = str(e)
    # a fixed latency table and no end-to-end timing: the family is decided by the database alone
    from ziplm_ext.methods.ziplm_oneshot import prune_oneshot

    fam = prune_oneshot(model, ids(20), [1.3, 1.6], ENV, family_config(), latency_table=synthetic_table(model))
    # (ranks other than 0 may return no family: only rank 0 delivers one)
    out["family"] = None if fam is None else [(r.widths, {k: v.clone() for k, v in r.model.state_dict().items()})
                                              for r in fam.results]
    return out


def _worker(rank: int, workdir: str) -> None:
    torch.set_num_threads(1)
    zdist.dist.init_process_group("gloo", init_method=f"file://{workdir}/store", rank=rank, world_size=WORLD,
                                  timeout=timedelta(seconds=240))
    try:
        torch.save(_scenarios(rank, Path(workdir)), f"{workdir}/rank{rank}.pt")
    finally:
        zdist.dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    wd = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(wd),), nprocs=WORLD, join=True)
    return [torch.load(wd / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- layer 0 helpers


def test_shard_bounds_uneven_and_empty():
    assert zdist.shard_bounds(5, 2) == [(0, 3), (3, 5)]
    assert zdist.shard_bounds(1, 3) == [(0, 1), (1, 1), (1, 1)]
    assert zdist.shard_bounds(0, 2) == [(0, 0), (0, 0)]
    for n in range(12):
        for w in range(1, 5):
            b = zdist.shard_bounds(n, w)
            sizes = [e - s for s, e in b]
            assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and b[0][0] == 0
            assert all(b[i][1] == b[i + 1][0] for i in range(w - 1))
    assert zdist.shard_of(list("abcde"), 1, 2) == ["d", "e"]
    with pytest.raises(ValueError, match="world size"):
        zdist.shard_bounds(3, 0)
    with pytest.raises(ValueError, match="rank 2 outside"):
        zdist.shard_of([1, 2], 2, 2)


def test_assignment_deterministic_and_balanced():
    costs = [5, 1, 9, 9, 3, 0, 7, 2]
    a = zdist.assign_by_cost(costs, 3)
    assert a == zdist.assign_by_cost(list(costs), 3)
    load = [sum(c for c, r in zip(costs, a) if r == k) for k in range(3)]
    assert max(load) <= 4 / 3 * (sum(costs) / 3) + max(costs) / 3
    assert a[2] == 0 and a[3] == 1  # ties: lower index first, onto the lower rank
    assert zdist.assign_by_cost([], 2) == []
    with pytest.raises(ValueError, match="costs"):
        zdist.assign_by_cost([1, -1], 2)
    model = tiny_llama(layers=4)
    layers = get_adapter(model).prunable_layers(model)
    owners = solve_owners(layers, 2)
    assert owners == solve_owners(list(layers), 2) and set(owners.values()) == {0, 1}
    ffn = [owners[l.name] for l in layers if l.kind == "ffn"]
    assert sorted(ffn) == [0, 0, 1, 1]  # the costly solves (96² x 96) are split evenly


def test_mean_divides_once():
    """Averaging per-rank means (ReduceOp.AVG) is wrong for uneven shards; sum, then divide once."""
    g = torch.Generator().manual_seed(0)
    X = [torch.randn(n, 4, dtype=torch.float64, generator=g) for n in (9, 1)]
    full = torch.cat(X)
    H_sum = sum(x.T @ x for x in X)
    assert torch.allclose(zdist.mean_hessian(H_sum, 10), full.T @ full / 10, rtol=1e-14, atol=0)
    avg_of_means = sum(x.T @ x / x.shape[0] for x in X) / 2
    assert not torch.allclose(avg_of_means, full.T @ full / 10, rtol=1e-3)
    with pytest.raises(ValueError, match="zero tokens"):
        zdist.mean_hessian(H_sum, 0)
    with pytest.raises(TypeError, match="float64"):
        zdist.reduce_hessian(H_sum.float(), 3, 0)


# ----------------------------------------------------------------------------- distributed runs


def test_reduced_hessian_is_the_sum_bit_for_bit(ranks):
    H, n = ranks[1]["reduced"]
    assert torch.equal(H, ranks[0]["local_H"] + ranks[1]["local_H"]) and n == 10
    assert ranks[0]["reduced"] == (None, 10)
    H0, n0 = ranks[0]["reduced_empty"]
    assert torch.equal(H0, ranks[0]["local_H"]) and n0 == 7 and ranks[1]["reduced_empty"] == (None, 7)


def test_calibration_hessians_and_token_counts(ranks):
    model = tiny_llama()
    x, mask = padded()
    single = {i: (H, n) for i, H, n in block_hessians(model, make_batches(x, mask, 2))}
    owners = ranks[0]["owners"]
    assert owners == ranks[1]["owners"]
    for i, (H_single, n_single) in single.items():
        local = [r["local_calib"][i] for r in ranks]
        assert local[0][1] + local[1][1] == n_single == int(mask.sum())  # exact token counts
        for name, Hs in H_single.items():
            owner = ranks[owners[name]]["reduced_calib"][i]
            other = ranks[1 - owners[name]]["reduced_calib"][i]
            assert name not in other[0] and owner[1] == other[1] == n_single
            assert torch.equal(owner[0][name], local[0][0][name] + local[1][0][name])  # bit for bit
            assert torch.allclose(owner[0][name], Hs, rtol=1e-13, atol=1e-12 * float(Hs.abs().max()))


def _compare(dist_snap: dict, single_snap: dict, exact: bool) -> None:
    assert list(dist_snap) == list(single_snap)
    for n, d in dist_snap.items():
        s = single_snap[n]
        assert torch.equal(d["order"], s["order"]), n  # the removal orders are identical
        if exact:
            for k in ("losses", "U", "R", "W0"):
                assert torch.equal(d[k], s[k]), (n, k)
            assert d["dense_error"] == s["dense_error"]
        else:
            # H differs from one process only in the order of float64 additions (relative ~1e-16);
            # the solve runs in W's precision (float32), so that is at most float32 rounding.
            assert torch.allclose(d["losses"], s["losses"], rtol=1e-5, atol=1e-9), n
            assert abs(d["dense_error"] - s["dense_error"]) <= 1e-12 * abs(s["dense_error"]), n
            for c, W in d["weights"].items():
                assert torch.allclose(W, s["weights"][c], rtol=1e-5, atol=1e-6), (n, c)


def test_database_uneven_shards_match_single_process(ranks):
    single = snapshot(build_database(tiny_llama(), make_batches(ids(6), None, 2), progress=False))
    _compare(ranks[0]["db_uneven"], single, exact=False)


def test_database_with_an_empty_rank_is_bit_identical(ranks):
    single = snapshot(build_database(tiny_llama(), make_batches(ids(2), None, 2), progress=False))
    for r in ranks:
        _compare(r["db_empty_rank"], single, exact=True)


def _equal_snapshots(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(
        all(torch.equal(a[n][k], b[n][k]) for k in ("order", "losses", "U", "R", "W0"))
        and a[n]["dense_error"] == b[n]["dense_error"] and a[n]["errors"] == b[n]["errors"]
        and all(torch.equal(a[n]["weights"][c], b[n]["weights"][c]) for c in a[n]["weights"]) for n in a)


def test_every_rank_ends_with_the_same_database(ranks):
    for key in ("db_uneven", "db_resumed", "db_empty_rank"):
        assert _equal_snapshots(ranks[0][key], ranks[1][key]), key


def test_resume_after_a_lost_entry(ranks):
    for r in ranks:
        assert r["untouched"] and r["rebuilt"]
        assert _equal_snapshots(r["db_resumed"], r["db_uneven"])


def test_distributed_workdir_resumes_in_one_process(ranks):
    """Entries written by the ranks are the single-process format: one process loads them all."""
    wd = Path(ranks[0]["workdir"])
    assert len(list((wd / "database").glob("*.pt"))) == 4
    db = build_database(tiny_llama(), make_batches(ids(6), None, 2), workdir=wd, progress=False)
    assert _equal_snapshots(snapshot(db), ranks[0]["db_uneven"])


def test_ranks_with_different_models_fail_clearly(ranks):
    for r in ranks:
        assert r["mismatch"] is not None and "ranks hold different models" in r["mismatch"]


def test_family_equals_single_process(ranks):
    from ziplm_ext.methods.ziplm_oneshot import prune_oneshot

    model = tiny_llama()
    fam = prune_oneshot(model, ids(20), [1.3, 1.6], ENV, family_config(), latency_table=synthetic_table(model))
    assert ranks[0]["family"] is not None
    for r in (r for r in ranks if r["family"] is not None):
        assert len(r["family"]) == len(fam.results)
        for (widths, sd), res in zip(r["family"], fam.results):
            assert widths == res.widths
            ref = res.model.state_dict()
            assert sd.keys() == ref.keys()
            assert all(torch.allclose(sd[k], ref[k], rtol=1e-5, atol=1e-6) for k in sd)
    for (w0, sd0), (w1, sd1) in zip(ranks[0]["family"], ranks[1]["family"] or []):
        assert w0 == w1 and all(torch.equal(sd0[k], sd1[k]) for k in sd0)


def test_not_distributed_without_a_process_group():
    assert not zdist.is_distributed() and zdist.rank() == 0 and zdist.world_size() == 1
    H = torch.eye(3, dtype=torch.float64)
    assert zdist.reduce_hessian(H, 4, 0) == (H, 4) and zdist.sum_count(4) == 4
    assert zdist.broadcast_object({"a": 1}) == {"a": 1}
    saved = os.environ.pop("WORLD_SIZE", None)
    try:
        assert zdist.init_from_env() is False
        os.environ["WORLD_SIZE"] = "two"
        with pytest.raises(ValueError, match="WORLD_SIZE must be an integer"):
            zdist.init_from_env()
    finally:
        os.environ.pop("WORLD_SIZE", None)
        if saved is not None:
            os.environ["WORLD_SIZE"] = saved


def test_weights_from_order_match_the_history():
    """Groundwork for layers too large to keep the full history: the order and the Hessian rebuild
    the weights of any level (float32 rounding of the history's rank-g updates apart)."""
    from ziplm_ext.stages.database import weights_from_order

    model = tiny_llama()
    batches = make_batches(ids(6), None, 2)
    db = build_database(model, batches, progress=False)
    hessians = {}
    for _, H, _ in block_hessians(model, batches):
        hessians.update(H)
    adapter = get_adapter(model)
    for name in db.names():
        e, h = db[name], db[name].history
        W = adapter.get_weight(model, e.layer).float()
        for k in sorted({0, 1, e.layer.num_structures // 2, e.layer.num_structures - 1, e.layer.num_structures}):
            ref = h.weights(k)
            got = weights_from_order(W, hessians[name], h.order, k, h.group_size, h.damp)
            tol = 1e-5 * float(ref.abs().max())
            assert got.dtype == ref.dtype and torch.allclose(got, ref, rtol=1e-4, atol=tol), (name, k)
    with pytest.raises(ValueError, match="k must be"):
        weights_from_order(W, hessians[name], h.order, h.num_structures + 1, h.group_size, h.damp)
    with pytest.raises(ValueError, match="do not fit"):
        weights_from_order(W[:, :-1], hessians[name], h.order, 0, h.group_size, h.damp)
