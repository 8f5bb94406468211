"""The flow's contract: invertibility, log-det against autograd (float64), gradients, train/eval, save/load."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flow.model.coupling import CAFFSubnet, ClassAttention, FlowLayer, soft_clamp
from flow.model.sanf import FlowConfig, SANFFlow, count_parameters, flow_loss
from flow.model.train import FlowTrainingError, TrainConfig, fit_flow, score_batches

CONFIGS = [
    pytest.param(dict(dim=8, use_caff=True), id="caff-even-D"),
    pytest.param(dict(dim=7, use_caff=True), id="caff-odd-D"),
    pytest.param(dict(dim=8, use_caff=False), id="nocaff-even-D"),
    pytest.param(dict(dim=7, use_caff=False), id="nocaff-odd-D"),
]


def make_flow(dim, use_caff, num_blocks=3, hidden=16, num_heads=4, seed=0):
    torch.manual_seed(seed)
    model = SANFFlow(FlowConfig(dim=dim, num_blocks=num_blocks, hidden=hidden, num_heads=num_heads,
                                use_caff=use_caff))
    # Larger output weights than the default init, so the couplings are far from the identity.
    with torch.no_grad():
        for layer in model.layers:
            for sub in (layer.subnet1, layer.subnet2):
                sub.fc.weight.mul_(4.0)
                sub.fc.bias.normal_(0, 0.5)
    return model.double()


def inputs(dim, batch=5, num_patches=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(batch, dim, generator=g, dtype=torch.float64)
    tokens = torch.randn(batch, num_patches, dim, generator=g, dtype=torch.float64)
    return y, tokens


def test_soft_clamp_exact_values_and_bound():
    alpha = 3.0
    s = torch.tensor([0.0, alpha, -alpha, 1e6, -1e6], dtype=torch.float64)
    c = soft_clamp(s, alpha)
    assert c[0].item() == 0.0
    assert c[1].item() == pytest.approx(alpha / 2, abs=1e-12)  # (2a/pi) atan(1) = a/2
    assert c[2].item() == pytest.approx(-alpha / 2, abs=1e-12)
    assert (c.abs() < alpha).all()
    assert c[3].item() == pytest.approx(alpha, abs=1e-5)
    small = torch.tensor([1e-4], dtype=torch.float64)
    assert soft_clamp(small, alpha).item() == pytest.approx(2 / math.pi * 1e-4, rel=1e-8)  # slope 2/pi at 0


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_round_trip_and_log_det_sum_to_zero(kwargs):
    model = make_flow(**kwargs)
    y, tokens = inputs(kwargs["dim"])
    z, log_det = model(y, tokens)
    y_back, log_det_inv = model.inverse(z, tokens)
    torch.testing.assert_close(y_back, y, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_det + log_det_inv, torch.zeros_like(log_det), atol=1e-10, rtol=0)
    assert log_det.abs().min() > 1e-3  # the test is not vacuous: the flow is far from volume preserving


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_log_det_matches_autograd_jacobian(kwargs):
    model = make_flow(**kwargs)
    y, tokens = inputs(kwargs["dim"], batch=3)
    _, log_det = model(y, tokens)
    for b in range(y.shape[0]):
        jac = torch.autograd.functional.jacobian(lambda x, b=b: model(x[None], tokens[b:b + 1])[0][0], y[b])
        sign, logabs = torch.linalg.slogdet(jac)
        assert abs(sign.item()) == 1.0  # the channel permutations make the sign +-1; log|det| is what counts
        assert log_det[b].item() == pytest.approx(logabs.item(), abs=1e-9)
        # and the inverse's log-det is the log-det of the inverse's Jacobian
        z = model(y[b:b + 1], tokens[b:b + 1])[0][0]
        jac_inv = torch.autograd.functional.jacobian(lambda x, b=b: model.inverse(x[None], tokens[b:b + 1])[0][0], z)
        assert model.inverse(z[None], tokens[b:b + 1])[1].item() == pytest.approx(
            torch.linalg.slogdet(jac_inv)[1].item(), abs=1e-9)


@pytest.mark.parametrize("use_caff", [True, False])
def test_single_layer_round_trip_and_log_det(use_caff):
    torch.manual_seed(0)
    layer = FlowLayer(5, hidden=8, num_heads=2, use_caff=use_caff, seed=3).double()
    y, tokens = inputs(5, batch=2)
    z, ld = layer(y, tokens)
    y_back, ld_inv = layer.inverse(z, tokens)
    torch.testing.assert_close(y_back, y, atol=1e-12, rtol=0)
    jac = torch.autograd.functional.jacobian(lambda x: layer(x[None], tokens[:1])[0][0], y[0])
    assert ld[0].item() == pytest.approx(torch.linalg.slogdet(jac)[1].item(), abs=1e-10)
    assert (ld + ld_inv).abs().max().item() < 1e-12


def test_log_scales_are_bounded_by_alpha_per_channel():
    """Each clamped log-scale lies in (-alpha, alpha), so |log-det of a layer| < alpha * D."""
    torch.manual_seed(0)
    layer = FlowLayer(6, hidden=8, num_heads=2, clamp=0.5, seed=0).double()
    with torch.no_grad():
        layer.subnet1.fc.bias.fill_(1e4)
        layer.subnet2.fc.bias.fill_(1e4)
    y, tokens = inputs(6)
    _, ld = layer(y, tokens)
    assert (ld < 0.5 * 6).all() and (ld > 0.5 * 6 - 1e-3).all()


@pytest.mark.parametrize("kwargs", CONFIGS)
def test_gradients_reach_every_parameter(kwargs):
    model = make_flow(**kwargs).float()
    y, tokens = inputs(kwargs["dim"], batch=4)
    z, log_det = model(y.float(), tokens.float())
    flow_loss(z, log_det).backward()
    inert = 0
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        grad = param.grad
        if name.endswith("attn.kv.bias"):  # b_k (first half) cancels in the softmax: exactly no gradient
            attn_dim = grad.shape[0] // 2
            assert (grad[:attn_dim] == 0).all(), name
            grad, inert = grad[attn_dim:], inert + 1
        assert grad.abs().sum().item() > 0, name
    assert inert == (2 * model.config.num_blocks if kwargs["use_caff"] else 0)


@pytest.mark.parametrize("shape", [(5, 13, 20, 4, 7), (3, 8, 16, 1, 1), (2, 6, 9, 3, 64)],
                         ids=["d13-heads4", "one-head", "many-tokens"])
def test_class_attention_computes_eq_6_to_10_as_written(shape):
    """The query-side form equals docs/method.md eq. (14)-(16) computed literally (float64), also for d not a multiple
    of heads."""
    batch, d, hidden, heads, P = shape
    torch.manual_seed(0)
    attn = ClassAttention(d, hidden, heads).double()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.7)  # larger than the default init, so the softmax is far from uniform
    g = torch.Generator().manual_seed(3)
    v = torch.randn(batch, d, generator=g, dtype=torch.float64)
    tokens = torch.randn(batch, P, d, generator=g, dtype=torch.float64)
    expected = attn.forward_as_written(v, tokens)
    torch.testing.assert_close(attn(v, tokens), expected, rtol=1e-12, atol=1e-12)
    attn.as_written = True
    assert torch.equal(attn(v, tokens), expected)
    # the key bias b_k cancels in the softmax, in the paper's form too
    attn.as_written = False
    with torch.no_grad():
        attn.kv.bias[: attn.attn_dim].add_(5.0)
    torch.testing.assert_close(attn.forward_as_written(v, tokens), expected, rtol=1e-12, atol=1e-12)


def test_class_attention_forms_have_the_same_gradients():
    torch.manual_seed(0)
    attn = ClassAttention(13, 20, 4).double()
    g = torch.Generator().manual_seed(4)
    v = torch.randn(4, 13, generator=g, dtype=torch.float64, requires_grad=True)
    tokens = torch.randn(4, 6, 13, generator=g, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(4, 20, generator=g, dtype=torch.float64)
    grads = []
    for form in (attn.forward, attn.forward_as_written):
        attn.zero_grad()
        out = (form(v, tokens) * weights).sum()
        inputs_grad = torch.autograd.grad(out, [v, tokens] + list(attn.parameters()), allow_unused=True)
        grads.append([torch.zeros(1) if g_ is None else g_ for g_ in inputs_grad])
    for (name, _), a, b in zip([("v", 0), ("tokens", 0)] + list(attn.named_parameters()), *grads, strict=True):
        if name == "kv.bias":  # b_k: exactly 0 in one form, float noise in the other
            a, b = a[attn.attn_dim:], b[attn.attn_dim:]
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_flow_scores_agree_with_the_as_written_attention():
    """The whole flow, trained form vs eq. (14)-(16) literally: same latents and log-dets in float64."""
    model = make_flow(dim=8, use_caff=True)
    y, tokens = inputs(8, num_patches=5)
    with torch.no_grad():
        z, ld = model(y, tokens)
        z_ref, ld_ref = model.set_attention_form(True)(y, tokens)
    assert all(m.as_written for m in model.modules() if isinstance(m, ClassAttention))
    torch.testing.assert_close(z, z_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ld, ld_ref, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        y_back, ld_inv = model.inverse(z, tokens)  # the inverse through the as-written form
    torch.testing.assert_close(y_back, y, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(ld_inv, -ld, rtol=1e-9, atol=1e-9)


def test_class_attention_is_finite_where_its_logits_overflow_float32():
    """Large finite inputs (logits near 1e40, past float32's 3.4e38): the softmax would be NaN on the plain
    product; the stable logits give the float64 result."""
    torch.manual_seed(0)
    attn = ClassAttention(13, 20, 4)
    g = torch.Generator().manual_seed(5)
    v = torch.randn(3, 13, generator=g) * 1e20
    tokens = torch.randn(3, 6, 13, generator=g) * 1e20
    with torch.no_grad():
        key_side = torch.einsum("bhe,hed->bhd", attn.q(v).view(3, 4, -1),
                                attn.kv.weight.view(2, 4, -1, 13)[0]) * attn.head_dim ** -0.5
        plain = torch.bmm(key_side, torch.cat([v.unsqueeze(1), tokens], 1).transpose(1, 2))
        assert torch.isinf(plain).any() and torch.isnan(torch.softmax(plain, -1)).any()  # the old computation
        out = attn(v, tokens)
        reference = attn.double()(v.double(), tokens.double())
    assert torch.isfinite(out).all()
    # float32 sums of 13 terms of ~1e20: an entry that cancels is off by float32's rounding of the terms, so
    # the tolerance is relative to the output's scale (a wrong attention weight would be off by that scale)
    scale = reference.abs().max().item()
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-5 * scale)


def test_class_attention_stable_logits_are_bit_exact_on_ordinary_inputs():
    """Power-of-two scaling changes no bit where nothing overflows: same output as softmax of the plain product."""
    from flow.model.coupling import stable_logits

    g = torch.Generator().manual_seed(6)
    for scale in (0.1, 1.0, 37.0, 3e4):
        key_side = torch.randn(4, 3, 9, generator=g) * scale
        tokens = torch.randn(4, 7, 9, generator=g) * scale
        plain = torch.bmm(key_side, tokens.transpose(1, 2))
        shifted = stable_logits(key_side, tokens)
        assert torch.equal(shifted, plain - plain.amax(-1, keepdim=True))
        assert torch.equal(torch.softmax(shifted, -1), torch.softmax(plain, -1))


def test_flow_is_finite_for_extreme_finite_rows():
    """A whole CAFF flow in float32 on rows of magnitude 1e19 (results within float32's range) stays finite and
    matches float64; the extreme rows among ordinary ones leave the ordinary ones as they are alone."""
    torch.manual_seed(0)
    model = SANFFlow(FlowConfig(dim=8, num_blocks=3, hidden=16, num_heads=4, use_caff=True)).eval()
    y, tokens = (t.float() for t in inputs(8, batch=6, num_patches=4))
    y[:3] *= 1e19
    tokens[:3] *= 1e19
    with torch.no_grad():
        z, log_det = model(y, tokens)
        z64, log_det64 = model.double()(y.double(), tokens.double())
        assert torch.isfinite(z64).all() and z64.abs().max() < 1e37  # representable in float32
        model.float()
        z_ordinary, log_det_ordinary = model(y[3:], tokens[3:])
    assert torch.isfinite(z).all() and torch.isfinite(log_det).all()
    torch.testing.assert_close(z.double(), z64, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(log_det.double(), log_det64, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(z[3:], z_ordinary, rtol=1e-6, atol=1e-6)  # per-sample scales: rows stay apart
    torch.testing.assert_close(log_det[3:], log_det_ordinary, rtol=1e-6, atol=1e-6)


def test_make_optimizer_is_fused_adam_with_the_train_config():
    from flow.model.train import make_optimizer

    config = TrainConfig(lr=1e-3, betas=(0.7, 0.9), eps=1e-6, weight_decay=1e-3)
    params = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = torch.nn.Linear(5, 3).double()
        optimizer = make_optimizer(model, config) if fused else torch.optim.Adam(
            model.parameters(), lr=1e-3, betas=(0.7, 0.9), eps=1e-6, weight_decay=1e-3)
        if fused:
            assert optimizer.defaults["fused"] is True
            assert (optimizer.defaults["lr"], optimizer.defaults["betas"], optimizer.defaults["eps"],
                    optimizer.defaults["weight_decay"]) == (1e-3, (0.7, 0.9), 1e-6, 1e-3)
        x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
        for _ in range(3):
            optimizer.zero_grad()
            model(x).pow(2).sum().backward()
            optimizer.step()
        params.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.manual_seed(0)
    initial = torch.cat([p.detach().flatten() for p in torch.nn.Linear(5, 3).double().parameters()])
    assert (params[0] - initial).abs().min() > 1e-4  # every parameter moved
    torch.testing.assert_close(params[0], params[1], rtol=1e-12, atol=1e-12)


def test_patch_tokens_stay_aligned_with_the_permuted_channels():
    """With every patch token equal to y, each layer's first subnet must see tokens equal to its input half."""
    model = make_flow(dim=9, use_caff=True, num_blocks=4)
    y, _ = inputs(9, batch=2)
    tokens = y[:, None, :].repeat(1, 3, 1)
    seen = []
    hooks = [layer.subnet1.register_forward_hook(lambda mod, args, out: seen.append(args))
             for layer in model.layers]
    model(y, tokens)
    for hook in hooks:
        hook.remove()
    assert len(seen) == 4
    for k, (v, layer_tokens) in enumerate(seen):
        if k == 0:
            torch.testing.assert_close(layer_tokens[:, 0], v, atol=0, rtol=0)
    # later layers receive the previous layer's output, which is no longer y; check the alignment
    # mechanism itself: tokens given to layer k are y's channels under the composed permutations.
    perm = torch.arange(9)
    for k, layer in enumerate(model.layers):
        perm = perm[layer.perm]
        torch.testing.assert_close(seen[k][1][:, 0], y[:, perm][:, : layer.dim_a], atol=0, rtol=0)


def test_caff_uses_patch_tokens_and_ablation_ignores_them():
    y, tokens = inputs(8)
    caff = make_flow(dim=8, use_caff=True)
    nocaff = make_flow(dim=8, use_caff=False)
    other = tokens + 1.0
    assert not torch.allclose(caff(y, tokens)[0], caff(y, other)[0])
    torch.testing.assert_close(nocaff(y, tokens)[0], nocaff(y, other)[0], atol=0, rtol=0)
    torch.testing.assert_close(nocaff(y, None)[0], nocaff(y, tokens)[0], atol=0, rtol=0)
    with pytest.raises(ValueError, match="patch tokens"):
        caff(y, None)
    with pytest.raises(ValueError, match=r"shape \(B, 8\)"):
        caff(y[:, :7], tokens)


def test_train_and_eval_mode_agree():
    model = make_flow(dim=8, use_caff=True)
    y, tokens = inputs(8)
    model.train()
    z_train, ld_train = model(y, tokens)
    model.eval()
    z_eval, ld_eval = model(y, tokens)
    torch.testing.assert_close(z_train, z_eval, atol=0, rtol=0)
    torch.testing.assert_close(ld_train, ld_eval, atol=0, rtol=0)


def test_scores_follow_the_change_of_variables_formula():
    model = make_flow(dim=8, use_caff=True)
    y, tokens = inputs(8)
    z, log_det = model(y, tokens)
    scores = model.scores(y, tokens)
    expected_nll = 0.5 * (z ** 2).sum(1) + 4 * math.log(2 * math.pi) - log_det
    torch.testing.assert_close(scores["nll"], expected_nll)
    torch.testing.assert_close(model.nll(y, tokens), expected_nll)
    torch.testing.assert_close(scores["z2"], (z ** 2).mean(1))


def test_flow_loss_exact_value():
    z = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    log_det = torch.tensor([0.5, -1.0])
    # sample 0: 0.5*5 - 0.5 = 2.0; sample 1: 0 + 1 = 1.0; mean 1.5; per dim (D=2): 0.75
    assert flow_loss(z, log_det).item() == pytest.approx(0.75, abs=1e-7)


def test_inverse_samples_have_the_model_density():
    """Sampling z ~ N(0, I) and inverting gives y whose nll equals -log N(z) + log|det dy/dz|... consistently."""
    model = make_flow(dim=6, use_caff=True)
    _, tokens = inputs(6, batch=4)
    z = torch.randn(4, 6, dtype=torch.float64)
    y, log_det_inv = model.inverse(z, tokens)
    log_pz = -0.5 * (z ** 2).sum(1) - 3 * math.log(2 * math.pi)
    torch.testing.assert_close(model.nll(y, tokens), -(log_pz - log_det_inv), atol=1e-9, rtol=0)


def expected_parameter_count(D: int, H: int, K: int, heads: int, use_caff: bool) -> int:
    """Parameters counted by hand from docs/method.md eq. (41) (Linear = weights + biases)."""
    def linear(i, o):
        return i * o + o

    def subnet(d_in, d_out):
        n = linear(d_in, H) + 2 * linear(H, H)
        if use_caff:
            da = heads * math.ceil(d_in / heads)
            n += linear(d_in, da) + linear(d_in, 2 * da) + linear(da, H) + H  # q, k+v, W_o, gamma
            n += linear(2 * H, 2 * d_out)
        else:
            n += linear(H, 2 * d_out)
        return n

    a = D // 2
    return K * (subnet(a, D - a) + subnet(D - a, a))


@pytest.mark.parametrize("D,use_caff", [(1024, True), (1024, False), (768, True), (1023, True)])
def test_parameter_count_matches_the_hand_count(D, use_caff):
    model = SANFFlow(FlowConfig(dim=D, use_caff=use_caff))
    assert count_parameters(model) == expected_parameter_count(D, 1024, 4, 4, use_caff)


def test_parameter_count_vit_large_value():
    """Recorded in docs/results.md ("Model size") and docs/method.md (eq. (41)) next to the paper's 13.6 M (Table 6)."""
    assert count_parameters(SANFFlow(FlowConfig(dim=1024))) == 48_295_936


def gaussian_tensors(n, dim=6, p=4, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randn(n, dim, generator=g) + shift
    return y, y[:, None, :] + 0.1 * torch.randn(n, p, dim, generator=g)


def test_fit_is_deterministic_and_learns():
    y, tokens = gaussian_tensors(64)
    cfg = FlowConfig(dim=6, num_blocks=2, hidden=16)
    train = TrainConfig(epochs=6, batch_size=16, lr=1e-3)
    m1, r1 = fit_flow(y, tokens, cfg, train, seed=3, progress=False)
    m2, r2 = fit_flow(y, tokens, cfg, train, seed=3, progress=False)
    assert r1.epoch_losses == r2.epoch_losses
    for (k, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert r1.epoch_losses[-1] < r1.epoch_losses[0]
    _, r3 = fit_flow(y, tokens, cfg, train, seed=4, progress=False)
    assert r3.epoch_losses != r1.epoch_losses
    assert not m1.training


def test_fit_handles_a_final_batch_of_one_sample():
    y, tokens = gaussian_tensors(33)
    _, result = fit_flow(y, tokens, FlowConfig(dim=6, num_blocks=1, hidden=8), TrainConfig(epochs=1, batch_size=32),
                         progress=False)
    assert result.num_samples == 33 and len(result.epoch_losses) == 1 and math.isfinite(result.final_loss)


def test_fit_stops_on_a_non_finite_loss():
    y, tokens = gaussian_tensors(16)
    y[5, 2] = float("nan")
    with pytest.raises(FlowTrainingError, match="non-finite train loss.*epoch 1"):
        fit_flow(y, tokens, FlowConfig(dim=6, num_blocks=1, hidden=8), TrainConfig(epochs=2, batch_size=16),
                 progress=False)


def test_fit_rejects_empty_and_mismatched_input():
    y, tokens = gaussian_tensors(4)
    with pytest.raises(ValueError, match="no training rows"):
        fit_flow(y[:0], tokens[:0], FlowConfig(dim=6), TrainConfig(epochs=1), progress=False)
    with pytest.raises(ValueError, match="D = 6"):
        fit_flow(y, tokens, FlowConfig(dim=5), TrainConfig(epochs=1), progress=False)


def test_scores_do_not_depend_on_the_batch_size():
    model = make_flow(dim=6, use_caff=True).float().eval()
    y, tokens = gaussian_tensors(23)
    reference = score_batches(model, y, tokens, batch_size=23)
    for batch_size in (1, 8, 7, 11):  # 23 = 2 * 11 + 1: a final batch of one sample
        scores = score_batches(model, y, tokens, batch_size=batch_size)
        for key in ("nll", "z2"):
            np.testing.assert_allclose(scores[key], reference[key], rtol=1e-5, atol=1e-5)
            assert scores[key].dtype == np.float64 and scores[key].shape == (23,)


def test_trained_flow_separates_shifted_gaussians():
    """Normal N(0, I), anomalies N(6, I): the likelihood ranks every anomaly above every normal sample."""
    from flow.experiments.metrics import auroc

    y, tokens = gaussian_tensors(256, seed=0)
    model, _ = fit_flow(y, tokens, FlowConfig(dim=6, num_blocks=2, hidden=32),
                        TrainConfig(epochs=15, batch_size=32, lr=1e-3), progress=False)
    normal_y, normal_t = gaussian_tensors(100, seed=1)
    anom_y, anom_t = gaussian_tensors(100, shift=6.0, seed=2)
    scores = score_batches(model, torch.cat([normal_y, anom_y]), torch.cat([normal_t, anom_t]))
    labels = np.r_[np.zeros(100), np.ones(100)]
    assert auroc(labels, scores["nll"]) >= 0.99
    assert auroc(labels, scores["z2"]) >= 0.99


def test_subnet_output_shapes_for_unequal_halves():
    sub = CAFFSubnet(in_dim=5, out_dim=6, hidden=12, num_heads=4)
    s, t = sub(torch.randn(3, 5), torch.randn(3, 7, 5))
    assert s.shape == (3, 6) and t.shape == (3, 6)
    assert sub.attn.attn_dim == 8  # 5 rounded up to a multiple of 4 heads


def test_flop_count_matches_the_hand_count_of_the_matrix_products():
    """ViT-L shapes (D = 1024, P = 64): 2 FLOPs per multiply-add of every matrix product.

    As written (docs/method.md eq. (14)-(16), keys and values of all 1 + P tokens; torch's counter leaves out the two
    attention products over the 1 + P tokens on CPU, 0.2 % here) and as computed (the query-side form of
    ClassAttention: W_k^T q, the logits and the weighted token sum per head, W_v on that sum).
    """
    from flow.model.sanf import count_flops

    d, H, P, da, heads = 512, 1024, 64, 512, 4
    common = d * H + 2 * H * H + d * da + da * H + 2 * H * 2 * d  # MLP, W_q, W_o, FC
    as_written = common + (1 + P) * d * 2 * da
    computed = common + da * d + 2 * heads * (1 + P) * d + da * d
    assert count_flops(FlowConfig(dim=1024), P, as_written=True) == 8 * 2 * as_written == 633_339_904
    assert count_flops(FlowConfig(dim=1024), P) == 8 * 2 * computed == 100_728_832
