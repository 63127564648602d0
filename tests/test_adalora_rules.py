"""AdaLoRA's pure rules (``adapad_jax.methods.adalora``) against PEFT's own AdaLoRA, driven with the same numbers.

PEFT is run as its docs say: gradients set (``loss.backward()``), an optimiser step (here plain SGD on the numbers
both sides share), then ``AdaLoraModel.update_and_allocate(step)``.
"""

import dataclasses
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from adapad_jax.methods import adalora

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

IN, HIDDEN, OUT = 5, 6, 3
MODULES = ("fc1", "fc2")
INIT_R, TARGET_R, ALPHA = 4, 2, 8
TINIT, TFINAL, DELTA_T, TOTAL = 3, 5, 2, 30
LR = 0.1


class _MLP(torch.nn.Module):
    """Two linear layers; the output's ``loss`` is 0 so PEFT's forward adds only the orthogonal regulariser."""

    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(IN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, OUT)

    def forward(self, x):
        h = self.fc2(torch.relu(self.fc1(x)))
        return types.SimpleNamespace(loss=(0 * h).sum(), logits=h)


def _peft_model(**overrides):
    torch.manual_seed(0)
    settings = dict(init_r=INIT_R, target_r=TARGET_R, lora_alpha=ALPHA, tinit=TINIT, tfinal=TFINAL,
                    deltaT=DELTA_T, total_step=TOTAL, target_modules=list(MODULES))
    config = peft.AdaLoraConfig(**{**settings, **overrides})
    return peft.get_peft_model(_MLP(), config).base_model  # the AdaLoraModel


def _layers(ada):
    return [getattr(ada.model, name) for name in MODULES]


def _peft_factor(layer, kind):
    """PEFT's lora_E / lora_A / lora_B as numpy in our layout (e [R], a [R, in], b [R, out])."""
    return _from_peft_layout(kind, getattr(layer, f"lora_{kind.upper()}")["default"].detach().numpy()).copy()


def _from_peft_layout(kind, value):
    return {"e": value[:, 0], "a": value, "b": value.T}[kind]


def _to_peft_layout(kind, value):
    return {"e": value[:, None], "a": value, "b": value.T}[kind]


def _schedule():
    return adalora.Schedule(init_budget=len(MODULES) * INIT_R, target_budget=len(MODULES) * TARGET_R, tinit=TINIT,
                            tfinal=TFINAL, total_steps=TOTAL, delta_t=DELTA_T)


def _max_diff(ours, ref):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - np.asarray(ref, np.float64))))


def test_update_and_allocate_matches_peft_at_every_step():
    """Budgets (``RankAllocator.budget_schedule``), EMAs (``update_ipt``), masks and E zeroing (``mask_to_budget``,
    ``mask_using_rank_pattern``) equal PEFT's ``AdaLoraModel.update_and_allocate`` at every one of the 30 steps."""
    ada = _peft_model()
    layers = _layers(ada)
    allocator = ada.rankallocator
    ours = {kind: [_peft_factor(layer, kind) for layer in layers] for kind in "eab"}
    state = adalora.init_state(ours)
    schedule = _schedule()
    rng = np.random.default_rng(0)
    worst = {"ema": 0.0, "e": 0.0}
    patterns = []
    for step in range(TOTAL):
        grads = {kind: [rng.standard_normal(x.shape).astype(np.float32) for x in ours[kind]] for kind in "eab"}
        for m, layer in enumerate(layers):  # PEFT: backward, optimizer.step(), then update_and_allocate
            for kind in "eab":
                param = getattr(layer, f"lora_{kind.upper()}")["default"]
                stepped = _peft_factor(layer, kind) - np.float32(LR) * grads[kind][m]
                param.data = torch.from_numpy(np.ascontiguousarray(_to_peft_layout(kind, stepped)))
                param.grad = torch.from_numpy(np.ascontiguousarray(_to_peft_layout(kind, grads[kind][m])))
        ada.update_and_allocate(step)
        ours = {kind: [x - np.float32(LR) * g for x, g in zip(ours[kind], grads[kind])] for kind in "eab"}
        new_e, state = adalora.allocate(state, ours, grads, step, schedule)
        ours["e"] = [np.asarray(x) for x in new_e]

        budget = adalora.budget_schedule(step, init_budget=schedule.init_budget,
                                         target_budget=schedule.target_budget, tinit=TINIT, tfinal=TFINAL,
                                         total_steps=TOTAL, delta_t=DELTA_T)
        assert budget == allocator.budget_schedule(step), f"step {step}: RankAllocator.budget_schedule"
        for m, name in enumerate(MODULES):
            for kind in "eab":
                key = f"{name}.lora_{kind.upper()}.default"
                for ema in adalora.EMA_KEYS:
                    mine = np.asarray(state["importance"][ema][kind][m])
                    if key in getattr(allocator, ema):
                        ref = _from_peft_layout(kind, getattr(allocator, ema)[key].numpy())
                    else:  # PEFT's reset_ipt empties the dicts at step total - tfinal
                        assert step >= TOTAL - TFINAL, f"step {step}: {key} missing from RankAllocator.{ema}"
                        ref = np.zeros_like(mine)
                    np.testing.assert_allclose(mine, ref, rtol=2e-6, atol=1e-9,
                                               err_msg=f"step {step} {key} {ema}: RankAllocator.update_ipt")
                    worst["ema"] = max(worst["ema"], _max_diff(mine, ref))
            peft_e = _peft_factor(layers[m], "e")
            np.testing.assert_array_equal(ours["e"][m] == 0, peft_e == 0,
                                          err_msg=f"step {step} {name}: E zeroed by RankAllocator.mask_to_budget")
            np.testing.assert_allclose(ours["e"][m], peft_e, rtol=0, atol=1e-6, err_msg=f"step {step} {name}: E")
            worst["e"] = max(worst["e"], _max_diff(ours["e"][m], peft_e))
        peft_pattern = ada.peft_config["default"].rank_pattern
        if state["rank_pattern"] is None:
            assert peft_pattern is None, f"step {step}: PEFT has a rank pattern and we do not"
        else:
            mine = [np.asarray(p).tolist() for p in state["rank_pattern"]]
            assert mine == [peft_pattern[f"{name}.lora_E.default"] for name in MODULES], (
                f"step {step}: rank pattern differs from AdaLoraModel.update_and_allocate's")
            patterns.append(sum(map(sum, mine)))
    # the run must exercise masking: ranks fall from 8 to the target 4 and stay there in the final phase
    assert patterns[0] < schedule.init_budget and patterns[-1] == schedule.target_budget
    assert worst["ema"] < 1e-6 and worst["e"] < 1e-6, worst


@pytest.mark.parametrize("init_r,target_r,tinit,tfinal,delta_t,total", [
    (INIT_R, TARGET_R, TINIT, TFINAL, DELTA_T, TOTAL),
    (12, 8, 0, 0, 1, 17),
    (6, 1, 10, 7, 3, 50),
    (3, 3, 2, 2, 1, 9),
    (5, 2, 0, 40, 10, 97),
])
def test_budget_schedule_matches_peft(init_r, target_r, tinit, tfinal, delta_t, total):
    """``budget_schedule`` equals ``RankAllocator.budget_schedule`` (budget and mask_ind) at every step."""
    allocator = _peft_model(init_r=init_r, target_r=target_r, tinit=tinit, tfinal=tfinal, deltaT=delta_t,
                            total_step=total).rankallocator
    for step in range(total + 3):
        ours = adalora.budget_schedule(step, init_budget=len(MODULES) * init_r,
                                       target_budget=len(MODULES) * target_r, tinit=tinit, tfinal=tfinal,
                                       total_steps=total, delta_t=delta_t)
        assert ours == allocator.budget_schedule(step), f"step {step}: RankAllocator.budget_schedule"


def _hand_set_scores(allocator, e_scores):
    """PEFT EMAs with sensitivity = the given E scores, uncertainty 1 on E and 0 on A and B."""
    for m, name in enumerate(MODULES):
        e = torch.tensor(e_scores[m], dtype=torch.float32)[:, None]
        for kind, shape in (("E", (INIT_R, 1)), ("A", (INIT_R, (IN, HIDDEN)[m])), ("B", ((HIDDEN, OUT)[m], INIT_R))):
            key = f"{name}.lora_{kind}.default"
            allocator.exp_avg_ipt[key] = e if kind == "E" else torch.ones(shape)
            allocator.exp_avg_unc[key] = torch.ones(shape) if kind == "E" else torch.zeros(shape)


def test_mask_to_budget_ties_follow_peft_kthvalue():
    """Every triplet at or below the k-th score is masked, so ties mask more than k (``RankAllocator.mask_to_budget``)."""
    ada = _peft_model()
    e_scores = [[1.0, 2.0, 2.0, 3.0], [2.0, 0.5, 4.0, 2.0]]
    _hand_set_scores(ada.rankallocator, e_scores)
    for layer in _layers(ada):
        layer.lora_E["default"].data = torch.ones(INIT_R, 1)
    peft_pattern = ada.rankallocator.mask_to_budget(ada.model, budget=5)
    ones = [jnp.ones(INIT_R)] * len(MODULES)
    new_e, pattern = adalora.mask_to_budget(ones, [jnp.asarray(s) for s in e_scores], 5)
    assert [np.asarray(p).tolist() for p in pattern] == [peft_pattern[f"{n}.lora_E.default"] for n in MODULES]
    assert sum(int(np.sum(p)) for p in pattern) == 2  # budget 5, but six scores tie at or below the 3rd
    jitted_e, jitted_pattern = jax.jit(adalora.mask_to_budget)(ones, [jnp.asarray(s) for s in e_scores], 5)
    assert [np.asarray(p).tolist() for p in jitted_pattern] == [np.asarray(p).tolist() for p in pattern]
    for m, layer in enumerate(_layers(ada)):
        np.testing.assert_array_equal(np.asarray(new_e[m]), _peft_factor(layer, "e"))


def test_mask_to_budget_keeps_all_where_peft_kthvalue_raises():
    """Deliberate difference: a budget >= the number of triplets masks nothing; PEFT's ``kthvalue`` (k <= 0) raises."""
    ada = _peft_model()
    e_scores = [[1.0, 2.0, 2.0, 3.0], [2.0, 0.5, 4.0, 2.0]]
    _hand_set_scores(ada.rankallocator, e_scores)
    with pytest.raises(RuntimeError):
        ada.rankallocator.mask_to_budget(ada.model, budget=len(MODULES) * INIT_R)
    e = [jnp.arange(1.0, INIT_R + 1.0)] * len(MODULES)
    new_e, pattern = adalora.mask_to_budget(e, [jnp.asarray(s) for s in e_scores], len(MODULES) * INIT_R)
    assert all(np.all(np.asarray(p)) for p in pattern)
    np.testing.assert_array_equal(np.asarray(new_e), np.asarray(e))


def _random_factors(rng, layers):
    """Random E (one entry zero, as a mask leaves it), A, B set on PEFT's layers; returns them in our layout."""
    ours = {"e": [], "a": [], "b": []}
    for layer in layers:
        for kind in "eab":
            shape = _peft_factor(layer, kind).shape
            value = rng.standard_normal(shape).astype(np.float32)
            if kind == "e":
                value[1] = 0.0
            getattr(layer, f"lora_{kind.upper()}")["default"].data = torch.from_numpy(
                np.ascontiguousarray(_to_peft_layout(kind, value)))
            ours[kind].append(value)
    return ours


def test_orthogonal_regulariser_matches_peft_forward():
    """``orth_reg_weight * orthogonal_regulariser`` equals what ``AdaLoraModel.forward`` adds to the loss."""
    ada = _peft_model()
    weight = ada.peft_config["default"].orth_reg_weight
    ours = _random_factors(np.random.default_rng(1), _layers(ada))
    ref = float(ada(torch.zeros(2, IN)).loss.detach())
    mine = weight * float(adalora.orthogonal_regulariser({k: [jnp.asarray(x) for x in v] for k, v in ours.items()}))
    assert ref > 1.0
    np.testing.assert_allclose(mine, ref, rtol=1e-6, err_msg="AdaLoraModel.forward's orthogonal regulariser")


@pytest.mark.parametrize("lora_alpha", [ALPHA, 0])
def test_svd_delta_matches_peft_svdlinear(lora_alpha):
    """``svd_delta`` with ``svd_scale`` equals ``SVDLinear.forward`` minus its base layer (scale alpha / (init_r + 1e-5))."""
    ada = _peft_model(lora_alpha=lora_alpha)
    layers = _layers(ada)
    ours = _random_factors(np.random.default_rng(2), layers)
    x = np.random.default_rng(3).standard_normal((3, 2, IN)).astype(np.float32)
    scale = adalora.svd_scale(lora_alpha, INIT_R)
    ranknum = float(layers[0].ranknum["default"].item()) + 1e-5
    assert scale == pytest.approx(layers[0].scaling["default"] / ranknum, rel=1e-12), "SVDLinear scaling / ranknum"
    hidden = x
    for m, layer in enumerate(layers):
        with torch.no_grad():
            ref = (layer(torch.from_numpy(hidden)) - layer.base_layer(torch.from_numpy(hidden))).numpy()
        mine = np.asarray(adalora.svd_delta(jnp.asarray(hidden), ours["e"][m], ours["a"][m], ours["b"][m], scale))
        assert np.abs(ref).max() > 0.1
        np.testing.assert_allclose(mine, ref, rtol=1e-5, atol=1e-6, err_msg=f"{MODULES[m]}: SVDLinear.forward")
        hidden = np.random.default_rng(4 + m).standard_normal((3, 2, HIDDEN)).astype(np.float32)


def test_reference_defaults_are_peft_config_defaults():
    """The defaults the module docstring lists are ``AdaLoraConfig``'s field defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(peft.AdaLoraConfig)}
    assert adalora.REFERENCE_DEFAULTS == {k: defaults[k] for k in adalora.REFERENCE_DEFAULTS}


@pytest.mark.parametrize("tinit,tfinal,total", [(10, 20, 30), (10, 21, 30), (0, 0, 0), (29, 0, 30), (0, 30, 30),
                                                (10, 19, 30), (0, 0, 1)])
def test_check_schedule_refuses_what_peft_refuses_in_one_line(tinit, tfinal, total):
    """``check_schedule`` refuses exactly the schedules ``AdaLoraConfig.__post_init__`` refuses, in one line."""
    try:
        peft.AdaLoraConfig(tinit=tinit, tfinal=tfinal, total_step=total, target_modules=list(MODULES))
        peft_refuses = False
    except ValueError:
        peft_refuses = True
    if not peft_refuses:
        adalora.check_schedule(tinit, tfinal, total)
        return
    with pytest.raises(ValueError) as error:
        adalora.check_schedule(tinit, tfinal, total)
    message = str(error.value)
    assert "\n" not in message and message.startswith("adalora: ")
    if total > 0:
        assert message == (f"adalora: tinit + tfinal must be < total_steps to leave a budgeting phase, got "
                           f"tinit={tinit} + tfinal={tfinal} = {tinit + tfinal} >= total_steps={total}; lower "
                           f"tinit/tfinal or train longer")


def test_final_phase_without_the_last_allocation_is_refused():
    """A step past total - tfinal needs the rank pattern frozen at total - tfinal; without it, one line."""
    params = {"e": [jnp.ones(INIT_R)], "a": [jnp.ones((INIT_R, IN))], "b": [jnp.ones((INIT_R, OUT))]}
    with pytest.raises(ValueError, match=r"^adalora: step 26 is in the final phase but step 25 was never allocated$"):
        adalora.allocate(adalora.init_state(params), params, params, TOTAL - TFINAL + 1, _schedule())


def test_schedule_refuses_bad_delta_t_before_any_compute():
    """deltaT 0 (PEFT: ZeroDivisionError mid-training) is refused when the schedule is built."""
    with pytest.raises(ValueError, match=r"^adalora: deltaT must be >= 1, got 0$"):
        adalora.Schedule(init_budget=8, target_budget=4, tinit=1, tfinal=1, total_steps=10, delta_t=0)
