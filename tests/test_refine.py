"""Static refinement, the RFM's layer selection and the transition matrix (docs/method.md, section 5)."""
import torch

from weclip.refine import refine_cams, select_attention, static_attention, transition_matrix


def random_attention(*shape):
    return torch.rand(*shape).softmax(-1)


def test_transition_matrix_is_symmetric_and_nonnegative():
    t = transition_matrix(random_attention(2, 16, 16))
    assert torch.allclose(t, t.transpose(-2, -1), atol=1e-6)
    assert (t >= 0).all()


def test_transition_matrix_is_one_walk_step_of_the_symmetrised_normalisation():
    a = random_attention(9, 9).double()
    t = a
    for _ in range(3):
        t = t / t.sum(0, keepdim=True)
        t = t / t.sum(1, keepdim=True)
    t = (t + t.T) / 2
    assert torch.allclose(transition_matrix(a), t @ t)


def test_static_attention_is_the_mean_of_the_last_maps():
    attn = random_attention(2, 12, 5, 5)
    assert torch.allclose(static_attention(attn, last=8), attn[:, 4:].mean(1))


def test_rfm_keeps_layers_whose_signed_difference_is_at_most_the_mean():
    affinity = torch.full((1, 4, 4), 0.5)
    offsets = torch.tensor([0.3, -0.2, 0.1, -0.4, 0.0, 0.2])  # map = affinity - offset
    attn = torch.cat([torch.rand(1, 6, 4, 4), affinity[:, None] - offsets.view(1, 6, 1, 1)], 1)
    r, keep = select_attention(attn, affinity, last=6)
    score = offsets * 16  # S = sum(A_f - map)
    assert keep.tolist() == [(score <= score.mean()).tolist()]
    kept = attn[:, 6:][keep]
    assert torch.allclose(r, kept.sum(0, keepdim=True) / (len(kept) + 1e-5) * affinity)


def test_rfm_absolute_difference_is_the_papers_variant():
    affinity = torch.full((1, 4, 4), 0.5)
    offsets = torch.tensor([0.3, -0.2, 0.1, -0.4, 0.0, 0.2])
    attn = affinity[:, None] - offsets.view(1, 6, 1, 1)
    _, keep = select_attention(attn, affinity, last=6, signed=False)
    score = offsets.abs()
    assert keep.tolist() == [(score <= score.mean()).tolist()]


def test_refined_cam_is_the_masked_transition_times_the_cam():
    t = transition_matrix(random_attention(2, 16, 16))
    cams, masks = torch.rand(2, 3, 4, 4), (torch.rand(2, 3, 4, 4) > 0.5).float()
    out = refine_cams(cams, masks, t)
    for b in range(2):
        for k in range(3):
            expected = (t[b] * masks[b, k].view(1, 16)) @ cams[b, k].view(16)
            assert torch.allclose(out[b, k].flatten(), expected, atol=1e-6)
