# SPDX-License-Identifier: MIT
"""BOFT and AdaLoRA fixtures (issue 16), called by tools/make_fixtures.py (--only boft_adalora).

BOFT: PEFT 0.21.2 builds BOFT layers with boft_n_butterfly_factor forced to 1 when its CUDA
extension fbd_cuda cannot be loaded (any CPU-only machine). To record what PEFT computes with
several butterfly factors, fbd_stub() stands in for that extension: a block-diagonal assembly
of the [N, D, b, b] rotations into [N, D·b, D·b], element for element what
fbd/fbd_cuda_kernel.cu writes; everything else (permutations, Cayley transform, product of
the factors, forward) is PEFT's own code.

AdaLoRA: the adapters are trained for a few steps with PEFT's RankAllocator
(update_and_allocate), so rank_pattern, the masked singular values and the saved (sliced)
tensors are what PEFT itself produces."""
import torch


class FbdStub:
    """The contract of PEFT's fbd_cuda extension (forward / backward of FastBlockDiag)."""

    @staticmethod
    def forward(x):
        return [torch.stack([torch.block_diag(*blocks.unbind(0)) for blocks in x.unbind(0)])]

    @staticmethod
    def backward(grad_output, x):
        n, d, b, _ = x.shape
        g = torch.empty_like(x)
        for k in range(d):
            g[:, k] = grad_output[:, k * b:(k + 1) * b, k * b:(k + 1) * b]
        return [g]


class use_fbd_stub:
    """Context manager: PEFT's BOFT sees a loaded fbd_cuda extension (so it keeps
    boft_n_butterfly_factor) while inside."""

    def __enter__(self):
        import peft.tuners.boft.layer as L
        self.L, self.old = L, L._FBD_CUDA
        L._FBD_CUDA = FbdStub()
        return self

    def __exit__(self, *a):
        self.L._FBD_CUDA = self.old


def no_fbd():
    """PEFT's own state on a CPU-only machine: no extension (tries to build it once, fails)."""
    import peft.tuners.boft.layer as L
    L._FBD_CUDA = None


def randomize_boft(seed):
    def f(model, _):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "boft_R" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
                elif "boft_s" in n:
                    p.copy_(1 + torch.randn(p.shape, generator=g) * 0.2)
    return f


def train_adalora(seed, steps):
    """Random factors, then `steps` optimisation steps of a random regression with PEFT's
    update_and_allocate after each (its documented loop), leaving PEFT's masks."""
    def f(model, _):
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_" in n:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
        model.train()
        x = torch.randn(16, 16, generator=g)
        t = torch.randn(16, 8, generator=g)
        for step in range(steps):
            loss = ((model(x) - t) ** 2).mean()
            loss.backward()
            opt.step()
            model.base_model.update_and_allocate(step)
            opt.zero_grad()
    return f


def boft_adalora_fixtures(out, peft_fixture, Tiny):
    from peft import BOFTConfig, AdaLoraConfig
    tm = ["q", "v", "head"]
    # in = 16, 24, 20: b = 4 gives nb = 4, 6, 5 (m = 1, what PEFT runs on a CPU).
    no_fbd()
    torch.manual_seed(70)
    peft_fixture(out, "peft_boft", Tiny(), BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=1, target_modules=tm,
                                                      init_weights=False), 1200, randomize=randomize_boft(1201))
    # boft_block_num = 4 with 2 factors asked for: PEFT on a CPU builds m = 1 anyway (b = 4, 6).
    torch.manual_seed(71)
    peft_fixture(out, "peft_boft_cpu_forced", Tiny(),
                 BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2, target_modules=["q", "v"],
                            init_weights=False), 1210, randomize=randomize_boft(1211))
    with use_fbd_stub():
        # m = 3 factors of b = 2 (q: nb = 8, v: nb = 12): PEFT's CUDA path.
        torch.manual_seed(72)
        peft_fixture(out, "peft_boft_butterfly", Tiny(),
                     BOFTConfig(boft_block_size=2, boft_n_butterfly_factor=3, target_modules=["q", "v"], init_weights=False),
                     1220, randomize=randomize_boft(1221))
        # m = 2 from boft_block_num = 4 (q: b = 4, v: b = 6).
        torch.manual_seed(73)
        peft_fixture(out, "peft_boft_num", Tiny(),
                     BOFTConfig(boft_block_size=0, boft_block_num=4, boft_n_butterfly_factor=2, target_modules=["q", "v"],
                                init_weights=False), 1230, randomize=randomize_boft(1231))
    no_fbd()
    # AdaLoRA: init_r = 4, budget to target_r = 2 on average, the masks from PEFT's allocator.
    torch.manual_seed(74)
    peft_fixture(out, "peft_adalora", Tiny(),
                 AdaLoraConfig(init_r=4, target_r=2, lora_alpha=6, tinit=1, tfinal=2, deltaT=1, total_step=8,
                               target_modules=tm), 1240, randomize=train_adalora(1241, 7))
    # No allocation (no rank_pattern), lora_alpha = 0: PEFT's scaling falls back to r.
    torch.manual_seed(75)
    peft_fixture(out, "peft_adalora_plain", Tiny(),
                 AdaLoraConfig(init_r=3, target_r=2, lora_alpha=0, total_step=10, target_modules=tm), 1250,
                 randomize=train_adalora(1251, 0))
