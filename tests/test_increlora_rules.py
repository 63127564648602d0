"""IncreLoRA's pure rules (``adapad_jax.methods.increlora``) against an oracle written here from the reference.

The reference (``FeiyuZhang98/IncreLoRA``) imports ``ipdb`` and a forked transformers, so it is not run; the
oracle below restates, in NumPy, what these files do (file names in each docstring / assertion message):
``loralib/loralib/increlora.py`` (L), ``NLU/src/transformers/trainer.py`` (T),
``NLU/src/transformers/optimization.py`` (O), ``NLU/scripts/rank=2/run_*.sh`` (S).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.methods import increlora as inc

torch = pytest.importorskip("torch")

BETA = 0.85


# ----------------------------------------------------------------------------------------------------------------
# The oracle (never calls the module under test).

def _oracle_w(a_rows, e_vals, b_cols, alpha, ranknum):
    """L ``loraW.forward``: cat(B, 1) @ (cat(A, 0) * cat(E, 0)) * scaling / (ranknum + 1e-5)."""
    b = np.stack(b_cols, axis=1)  # [out, n]
    a = np.stack(a_rows, axis=0)  # [n, in]
    return b @ (a * np.asarray(e_vals)[:, None]) * alpha / (ranknum + 1e-5)


def _oracle_score(w, grad):
    """L ``SVDLinear.backward_hook``: sum(|W| * grad).abs() / sqrt(W.numel())."""
    return np.sum(np.abs(np.abs(w) * grad)) / math.sqrt(w.size)


class _OracleAllocator:
    """L ``RankAllocator.update_and_increase`` / ``update_ipt`` / ``increase_to_target_rank`` on ragged lists."""

    def __init__(self, num_modules, lora_r, target_total, init_warmup, interval, top_h, add_r=1):
        self.e = [[0.0] * lora_r for _ in range(num_modules)]  # reset_parameters: lora_E zeros
        self.e_group = [[-1] * lora_r for _ in range(num_modules)]  # built with the optimiser
        self.ab_group = [[-1] * lora_r for _ in range(num_modules)]
        self.ranknum = [lora_r] * num_modules
        self.total = lora_r * num_modules
        self.target, self.warmup, self.interval, self.top_h, self.add_r = (
            target_total, init_warmup, interval, top_h, add_r)
        self.ipt = [0.0] * num_modules
        self.avg_ipt = [0.0] * num_modules
        self.avg_unc = [0.0] * num_modules
        self.hooks = True

    def _reserve(self, m, step):  # add_reserve_param(advance_learn=True): E = 1e-5 frozen, A and B trainable
        for _ in range(self.add_r):
            self.e[m].append(1e-5)
            self.e_group[m].append(None)
            self.ab_group[m].append(step)

    def step(self, step, scores):
        if step == 0:
            for m in range(len(self.e)):
                self._reserve(m, 0)
        grown = None
        if self.total < self.target:
            for m, s in enumerate(scores):  # update_ipt
                self.ipt[m] = s
                self.avg_ipt[m] = BETA * self.avg_ipt[m] + (1 - BETA) * self.ipt[m]
                self.avg_unc[m] = BETA * self.avg_unc[m] + (1 - BETA) * abs(self.ipt[m] - self.avg_ipt[m])
            if step > self.warmup and step % self.interval == 0:
                all_is = np.array([i * u for i, u in zip(self.avg_ipt, self.avg_unc)], np.float32)
                k = min(self.top_h, self.target - self.total)
                threshold = sorted(all_is.tolist(), reverse=True)[k - 1]
                grown = []
                for m in range(len(self.e)):
                    if all_is[m] >= threshold:
                        grown.append(m)
                        self.ranknum[m] += self.add_r
                        self.total += self.add_r
                        for j in range(len(self.e[m]) - self.add_r, len(self.e[m])):
                            self.e_group[m][j] = step  # lora_E[-add_r:] requires_grad, new param group
                        self._reserve(m, step)
                if self.total == self.target:
                    self.hooks = False
                    for m in range(len(self.e)):
                        for j in range(len(self.e[m]) - self.add_r, len(self.e[m])):
                            self.e[m][j] = 0.0
        return grown


def _oracle_multiplier(step, created, warmup, total):
    """O ``Multi_LambdaLR`` with T ``Trainer.train``'s order, as a closed form derived by hand from the files."""
    if created >= 0 and step == created:
        return 1.0
    c, horizon = step - created - 1, total - created - 1
    return c / max(1, warmup) if c < warmup else max(0.0, (horizon - c) / max(1, horizon - warmup))


# ----------------------------------------------------------------------------------------------------------------

def test_scale_and_delta_follow_lorw_with_the_committed_count():
    """L ``loraW``: ΔW = B (A * E) alpha / (ranknum + 1e-5), ranknum the committed count, reserves in the product."""
    rng = np.random.default_rng(0)
    slots, d_in, d_out, alpha = 5, 4, 3, 16
    a, b = rng.normal(size=(slots, d_in)), rng.normal(size=(slots, d_out))
    e = np.array([0.3, -0.2, 1e-5, 0.0, 0.0])  # two committed, one reserve, two unused
    for ranknum in (1, 2, 7):
        scale = inc.module_scale(alpha, ranknum, lora_r=1)
        assert scale == pytest.approx(alpha / (ranknum + 1e-5), rel=1e-15), "L loraW scale"
        got = jax.jit(inc.delta_weight)(jnp.asarray(e, jnp.float32), jnp.asarray(a, jnp.float32),
                                        jnp.asarray(b, jnp.float32), scale)
        want = _oracle_w(list(a[:3]), e[:3], list(b[:3]), alpha, ranknum)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-9, err_msg="L loraW.forward")
    assert inc.module_scale(0, 3, lora_r=2) == pytest.approx(2 / (3 + 1e-5)), "L SVDLinear: r stands in for alpha<=0"


def test_scores_and_emas_follow_backward_hook_and_update_ipt():
    """L ``backward_hook`` score and ``update_ipt`` EMAs (Ū against the new Ī), score Ī·Ū, over several steps."""
    rng = np.random.default_rng(1)
    shapes = [(3, 4), (5, 2), (4, 4)]
    importance = inc.init_state(len(shapes), 4, 1).importance
    avg_ipt, avg_unc = np.zeros(3), np.zeros(3)
    update = jax.jit(inc.update_importance)
    for _ in range(6):
        scores = []
        for m, shape in enumerate(shapes):
            w, g = rng.normal(size=shape), rng.normal(size=shape)
            got = float(inc.module_score(jnp.asarray(w, jnp.float32), jnp.asarray(g, jnp.float32)))
            want = _oracle_score(w, g)
            assert got == pytest.approx(want, rel=1e-5), "L SVDLinear.backward_hook score"
            scores.append(want)
        importance = update(importance, jnp.asarray(scores, jnp.float32))
        avg_ipt = BETA * avg_ipt + (1 - BETA) * np.array(scores)
        avg_unc = BETA * avg_unc + (1 - BETA) * np.abs(np.array(scores) - avg_ipt)
        np.testing.assert_allclose(importance["exp_avg_ipt"], avg_ipt, rtol=1e-5, err_msg="L update_ipt Ī")
        np.testing.assert_allclose(importance["exp_avg_unc"], avg_unc, rtol=1e-5, err_msg="L update_ipt Ū")
        np.testing.assert_allclose(inc.importance_score(importance), avg_ipt * avg_unc, rtol=1e-5,
                                   err_msg="L calculate_score Ī·Ū")


def _run_both(num_modules, score_fn, steps, *, lora_r=1, target_total, warmup, interval, top_h, slots=None):
    """Drive the module's ``allocate`` and the oracle with the same scores; compare after every step."""
    schedule = inc.Schedule(target_total=target_total, init_warmup=warmup, incre_interval=interval, top_h=top_h)
    slots = slots or inc.slots_needed(lora_r, target_total, num_modules, 1)
    state = inc.init_state(num_modules, slots, lora_r)
    e = inc.init_lambda(num_modules, slots)
    oracle = _OracleAllocator(num_modules, lora_r, target_total, warmup, interval, top_h)
    history = []
    for step in range(steps):
        scores = score_fn(step)
        e, state, grown = inc.allocate(state, e, scores if state.scoring else None, step, schedule)
        want_grown = oracle.step(step, scores)
        assert (None if grown is None else np.flatnonzero(grown).tolist()) == want_grown, f"L growth, step {step}"
        assert state.ranknum.tolist() == oracle.ranknum, f"L ranknum, step {step}"
        assert state.total_rank == oracle.total, f"L total_rank, step {step}"
        assert state.scoring == (oracle.total < oracle.target), f"L update_and_increase guard, step {step}"
        e_trainable, ab_trainable = inc.trainable_masks(state)
        for m in range(num_modules):
            n = len(oracle.e[m])
            assert int(state.allocated[m]) == n, f"L ParameterList length, module {m}, step {step}"
            np.testing.assert_allclose(np.asarray(e[m][:n]), oracle.e[m], rtol=1e-6, atol=0,
                                       err_msg=f"L lora_E values, module {m}, step {step}")
            assert not np.asarray(e[m][n:]).any(), "unused slots carry E = 0"
            assert e_trainable[m, :n].tolist() == [g is not None for g in oracle.e_group[m]], "L E requires_grad"
            assert ab_trainable[m, :n].all(), "L add_reserve_param(advance_learn=True): A, B trainable"
            assert [g if g is not None else inc.FROZEN for g in oracle.e_group[m]] == state.e_group[m, :n].tolist()
            assert oracle.ab_group[m] == state.ab_group[m, :n].tolist(), "L new param groups (A, B)"
        np.testing.assert_allclose(state.importance["exp_avg_ipt"], oracle.avg_ipt, rtol=1e-5)
        np.testing.assert_allclose(state.importance["exp_avg_unc"], oracle.avg_unc, rtol=1e-5)
        history.append((step, grown, state, e))
    return history


def test_growth_matches_the_reference_allocator_over_a_run():
    """L ``update_and_increase``: growth only when step > init_warmup and step % interval == 0, to the budget."""
    rng = np.random.default_rng(2)
    table = rng.uniform(0.1, 2.0, size=(40, 6))
    history = _run_both(6, lambda s: table[s].tolist(), 40, target_total=12, warmup=4, interval=4, top_h=2)
    growth_steps = [step for step, grown, _, _ in history if grown is not None]
    assert growth_steps[0] == 8, "L: step == init_warmup does not grow (strict >)"
    assert history[-1][2].total_rank == 12 and not history[-1][2].scoring


def test_ties_grow_more_than_k_and_overshoot_keeps_the_reserves():
    """L ``increase_to_target_rank``: ``>=`` the k-th largest grows every tied module, even past the target."""
    scores = [3.0, 2.0, 2.0, 1.0]
    assert inc.select_growth(np.array([9.0, 4.0, 4.0, 1.0]), 4, 10, 2).tolist() == [True, True, True, False], \
        "L torch.topk(...)[0][-1] threshold with >=: a tie at the k-th value adds more than k"
    history = _run_both(4, lambda s: scores, 4, target_total=6, warmup=1, interval=2, top_h=2)
    step, grown, state, e = history[2]
    assert step == 2 and grown.tolist() == [True, True, True, False], "L >= threshold: 3 modules for k = 2"
    assert state.total_rank == 7 > 6 and not state.scoring, "L: overshoot stops scoring (total < target fails)"
    assert float(e[3][1]) == pytest.approx(1e-5), "L: total != target, so the reserves are never zeroed"


def test_lambda_lifecycle():
    """L: first E 0 trainable; reserve E 1e-5 frozen; promoted E trainable from 1e-5; at budget reserves E = 0."""
    history = _run_both(3, lambda s: [3.0, 2.0, 1.0], 7, target_total=5, warmup=1, interval=2, top_h=1)
    _, _, state, e = history[0]
    e_train, ab_train = inc.trainable_masks(state)
    assert float(e[0][0]) == 0.0 and e_train[0, 0], "L reset_parameters: lora_E[0] = 0, trainable"
    assert float(e[0][1]) == pytest.approx(1e-5) and not e_train[0, 1] and ab_train[0, 1], \
        "L add_reserve_param: E = 1e-5 frozen, A / B trainable"
    step, grown, state, e = history[2]
    e_train, _ = inc.trainable_masks(state)
    assert grown.tolist() == [True, False, False]
    assert float(e[0][1]) == pytest.approx(1e-5) and e_train[0, 1] and state.e_group[0, 1] == 2, \
        "L increase_to_target_rank: promoted E joins the step-2 group from 1e-5"
    assert float(e[0][2]) == pytest.approx(1e-5) and not e_train[0, 2], "L: a new reserve follows"
    assert state.ranknum.tolist() == [2, 1, 1]
    step, grown, state, e = history[4]
    assert state.total_rank == 5 and not state.scoring
    for m in range(3):
        stop = int(state.allocated[m])
        assert float(e[m][stop - 1]) == 0.0, "L: at the budget the last reserves' E are filled with 0"
    assert float(e[0][2]) == pytest.approx(1e-5), "L: the E promoted at the budget step keeps 1e-5"
    for key in ("exp_avg_ipt", "exp_avg_unc"):
        np.testing.assert_array_equal(history[6][2].importance[key], state.importance[key],
                                      err_msg="L: update_ipt stops once total == target")


def test_capacity_and_bad_settings_fail_with_one_line():
    """Deliberate differences: a clear error where the reference raises KeyError or grows a list."""
    with pytest.raises(ValueError, match="target_rank 16 is not one of"):
        inc.incre_rank_num_for(16)
    assert inc.incre_rank_num_for(2) == 1 and inc.incre_rank_num_for(8) == 4, "L RankAllocator rank_dic"
    schedule = inc.Schedule(target_total=8, init_warmup=0, incre_interval=1, top_h=1)
    state, e = inc.init_state(2, 3, 1), inc.init_lambda(2, 3)
    e, state, _ = inc.allocate(state, e, [1.0, 0.0], 0, schedule)
    e, state, _ = inc.allocate(state, e, [1.0, 0.0], 1, schedule)
    with pytest.raises(ValueError, match="module 0 needs 4 slots but has 3"):
        inc.allocate(state, e, [1.0, 0.0], 2, schedule)


@pytest.mark.parametrize("created, checks", [
    # created with the optimiser: T = 1000, w = 100
    (-1, {0: 0.0, 50: 0.5, 100: 1.0, 550: 0.5, 999: 1 / 900}),
    # added at step 300: default lr at 300, then warm-up restarts; T' = 1000 - 301 = 699
    (300, {300: 1.0, 301: 0.0, 351: 0.5, 401: 1.0, 700: 300 / 599, 999: 1 / 599}),
])
def test_group_lr_restarts_warmup_hand_values(created, checks):
    """O ``Multi_LambdaLR.check_new_params`` / ``get_lr`` with T's step order, hand-computed."""
    for step, want in checks.items():
        assert inc.group_lr_multiplier(step, created, 100, 1000) == pytest.approx(want, abs=1e-12), \
            f"O Multi_LambdaLR, group from {created}, step {step}"


class _PerGroupWarmup(torch.optim.lr_scheduler.LambdaLR):
    """O ``Multi_LambdaLR`` restated: each new group gets its own counter and lambda over the remaining steps."""

    def __init__(self, optimizer, warmup, total):
        self.warmup, self.total = warmup, total
        self.counters = [-1] * len(optimizer.param_groups)
        super().__init__(optimizer, self._lambda(total))

    def _lambda(self, horizon):
        w = self.warmup
        return lambda c: c / max(1, w) if c < w else max(0.0, (horizon - c) / max(1, horizon - w))

    def get_lr(self):
        if len(self.optimizer.param_groups) > len(self.counters):
            self.counters.append(-1)
            self.lr_lambdas.append(self._lambda(self.total - self.last_epoch))
            group = self.optimizer.param_groups[-1]
            group.setdefault("initial_lr", group["lr"])
            self.base_lrs.append(group["initial_lr"])
        self.counters = [c + 1 for c in self.counters]
        return [base * f(c) for f, base, c in zip(self.lr_lambdas, self.base_lrs, self.counters)]


def test_group_lr_matches_torch_scheduler_order():
    """O + T: groups added by the allocator before ``optimizer.step``, scheduler stepped after, real torch."""
    warmup, total, base = 3, 20, 0.5
    created = {0: None, 4: None, 9: None}
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    scheduler = _PerGroupWarmup(optimizer, warmup, total)
    groups = [-1]
    for step in range(total):
        if step in created:
            optimizer.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
            groups.append(step)
        for group, created_at in zip(optimizer.param_groups, groups):
            want = group["lr"] / base
            assert inc.group_lr_multiplier(step, created_at, warmup, total) == pytest.approx(want, abs=1e-12), \
                f"O Multi_LambdaLR under torch, group {created_at}, step {step}"
            assert _oracle_multiplier(step, created_at, warmup, total) == pytest.approx(want, abs=1e-12)
        optimizer.step()
        scheduler.step()


def test_slot_lr_multipliers_follow_the_groups():
    """Per slot: A / B use the group of the step they became a reserve, E the step it was promoted; 0 if frozen."""
    history = _run_both(3, lambda s: [3.0, 2.0, 1.0], 3, target_total=6, warmup=1, interval=2, top_h=1)
    state = history[2][2]
    e_mult, ab_mult = inc.slot_lr_multipliers(state, 7, 2, 20)
    assert e_mult[0, 0] == pytest.approx(_oracle_multiplier(7, -1, 2, 20))
    assert e_mult[0, 1] == pytest.approx(_oracle_multiplier(7, 2, 2, 20)), "promoted at 2: restarted warm-up"
    assert ab_mult[0, 1] == pytest.approx(_oracle_multiplier(7, 0, 2, 20)), "reserve since step 0"
    assert e_mult[1, 1] == 0.0 and e_mult[0, 2] == 0.0, "frozen reserve E"
    e_mult, ab_mult = inc.slot_lr_multipliers(state, 2, 2, 20)
    assert ab_mult[0, 2] == 0.0 and e_mult[0, 1] == 0.0, "no gradient at the group's creation step"


def test_orthogonal_regulariser_is_compute_svd_orth_regu():
    """T ``compute_svd_orth_regu``: ||cat A cat A^T - I|| + ||cat B^T cat B - I||, mean over 2M, reserves in."""
    rng = np.random.default_rng(3)
    slots, d_in, d_out = 5, 6, 4
    allocated = [2, 4, 3]
    a = [rng.normal(size=(slots, d_in)) for _ in allocated]
    b = [rng.normal(size=(slots, d_out)) for _ in allocated]
    want = 0.0
    for m, n in enumerate(allocated):
        wa, wb = a[m][:n], b[m][:n].T  # cat(lora_A, 0) [n, in], cat(lora_B, 1) [out, n]
        want += np.linalg.norm(wa @ wa.T - np.eye(n)) + np.linalg.norm(wb.T @ wb - np.eye(n))
    want /= 2 * len(allocated)
    state = inc.init_state(3, slots, 1)
    state = type(state)(**{**state.__dict__, "allocated": np.array(allocated)})
    got = jax.jit(inc.orthogonal_regulariser)({"a": [jnp.asarray(x, jnp.float32) for x in a],
                                      "b": [jnp.asarray(x, jnp.float32) for x in b]},
                                     inc.allocated_mask(state, slots))
    assert float(got) == pytest.approx(want, rel=1e-5), "T compute_svd_orth_regu"


# BASELINES.md's IncreLoRA section (lr, top_h, warm-up = interval, max_len, orth); QQP's lr is not listed there
# and comes from S run_qqp.sh; epochs are S's only.
BASELINES = {
    "cola": (8e-4, 3, 100, 64, 0.1), "mrpc": (1e-3, 6, 100, 320, 0.1), "rte": (1.2e-3, 5, 100, 320, 0.3),
    "stsb": (2.2e-3, 4, 100, 128, 0.3), "sst2": (8e-4, 5, 1000, 128, 0.1), "qqp": (4e-4, 3, 1000, 320, 0.1),
    "mnli": (3.5e-4, 2, 1000, 256, 0.1), "qnli": (7e-4, 12, 500, 512, 0.1),
}
EPOCHS = {"cola": 25, "mrpc": 30, "rte": 50, "stsb": 25, "sst2": 24, "qqp": 7, "mnli": 9, "qnli": 5}


def test_glue_settings_match_baselines_and_scripts():
    """S ``run_*.sh`` values, checked against /work/shared/docs/BASELINES.md's list."""
    assert set(inc.GLUE_SETTINGS) == set(BASELINES)
    for task, (lr, top_h, interval, max_len, orth) in BASELINES.items():
        got = inc.GLUE_SETTINGS[task]
        assert (got["lr"], got["top_h"], got["interval"], got["max_len"], got["orth"]) == \
            (lr, top_h, interval, max_len, orth), f"S run_{task}.sh vs BASELINES.md"
        assert got["batch"] == 32 and got["epochs"] == EPOCHS[task], f"S run_{task}.sh batch / epochs"
    assert (inc.GLUE_TARGET_RANK, inc.GLUE_LORA_R) == (2, 1), "S: --target_rank 2 --lora_r 1"
    assert inc.incre_rank_num_for(inc.GLUE_TARGET_RANK) == 1, "BASELINES: one rank per promotion"


def test_the_cap_leaves_modules_at_r_max_out_of_the_growth_and_k_shrinks_to_the_eligible():
    """Ours, not the reference's (docs/methods/increlora.md, difference 2): adapter.r_max caps a module's rank."""
    from adapad_jax.methods.increlora import select_growth

    scores = np.array([5.0, 4.0, 3.0, 3.0, 1.0], np.float32)
    # uncapped: top-2 by score
    np.testing.assert_array_equal(select_growth(scores, 5, 20, 2), [True, True, False, False, False])
    # the two best are at the cap: the next two (tied at 3, the >= rule takes both) grow instead
    eligible = np.array([False, False, True, True, True])
    np.testing.assert_array_equal(select_growth(scores, 5, 20, 2, eligible), [False, False, True, True, False])
    # one eligible module: k shrinks to 1; none: nothing grows
    np.testing.assert_array_equal(select_growth(scores, 5, 20, 3, np.array([0, 0, 0, 0, 1], bool)),
                                  [False, False, False, False, True])
    assert not select_growth(scores, 5, 20, 3, np.zeros(5, bool)).any()
