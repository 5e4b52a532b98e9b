"""FP8 (e4m3) math for the routed experts, in the compressed-tensors "channel/token" scheme.

Weights: float8_e4m3fn [out, in] with one fp32 scale per output row, as stored in the Maverick FP8
release. Activations: quantized per token at run time. The product goes through `torch._scaled_mm`
(bf16 out with rowwise scales; fp32 out for fp32 models), which runs on sm_89+ GPUs and on the CPU.
`dequantize` gives the same weights in a float dtype, for GPUs without FP8 and as the oracle.
"""

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
_MIN_SCALE = 1e-12  # an all-zero row still gets a finite scale


def quantize_rowwise(x: torch.Tensor, amax: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [rows, cols] float -> (x_fp8 [rows, cols], scale [rows, 1] fp32) with x ≈ x_fp8 * scale.
    amax [rows, 1] fp32: each row's largest magnitude, when it is known to be another (the whole
    row's, of which x holds this tensor-parallel rank's columns); by default x's own."""
    if amax is None:
        amax = x.abs().amax(dim=-1, keepdim=True).float()
    scale = (amax / FP8_MAX).clamp(min=_MIN_SCALE)
    x_fp8 = (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return x_fp8, scale


def dequantize(w_fp8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w_fp8 [..., out, in], scale [..., out, 1] or [..., out] -> w [..., out, in] in dtype."""
    if scale.dim() == w_fp8.dim() - 1:
        scale = scale.unsqueeze(-1)
    return (w_fp8.float() * scale.float()).to(dtype)


def fp8_linear(
    x: torch.Tensor, w_fp8: torch.Tensor, w_scale: torch.Tensor, x_amax: torch.Tensor | None = None
) -> torch.Tensor:
    """y = x @ w.T with x quantized per token. x [tokens, in]; w_fp8 [out, in]; w_scale [out] fp32;
    x_amax [tokens, 1]: the tokens' scale basis when not x's own (see quantize_rowwise).

    Returns [tokens, out] in x's dtype. A bf16 x: the rowwise-scaled product in bf16, as the GPU
    kernel gives it. An fp32 x: the product in fp32, scaled after the matmul (unit tensorwise scales,
    which every `_scaled_mm` backend takes with an fp32 output), so that a tensor-parallel rank's
    partial sum is not rounded to bf16 before the all-reduce, and TP N equals TP 1 to fp32 rounding.
    """
    x_fp8, x_scale = quantize_rowwise(x, x_amax)  # [tokens, in], [tokens, 1]
    w_scale = w_scale.view(1, -1).float()  # [1, out]
    if x.dtype == torch.float32:
        one = torch.ones((), device=x.device)
        y = torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return y * x_scale * w_scale
    y = torch._scaled_mm(
        x_fp8,
        w_fp8.t(),  # column-major [in, out], as _scaled_mm wants its second operand
        scale_a=x_scale,
        scale_b=w_scale,
        out_dtype=torch.bfloat16,
    )
    return y.to(x.dtype)


def fp8_supported(device: torch.device) -> bool:
    """`_scaled_mm` with rowwise scales: the CPU, and CUDA GPUs of compute capability 8.9 or newer."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return False
