"""Every format number requant relies on, in one place, each with where it comes from."""

# --- compressed-tensors "pack-quantized" INT4 (upstream Kimi-K2.6 routed experts) -----------------
INT4_BITS = 4
INT4_PER_INT32 = 32 // INT4_BITS  # 8 nibbles per int32 word, least-significant nibble first
INT4_MIN, INT4_MAX = -8, 7  # signed 4-bit range
INT4_OFFSET = -INT4_MIN  # a nibble stores q + 8, so 0..15 maps back to -8..7
INT4_GROUP_SIZE = 32  # one BF16 scale per 32 consecutive input columns (strategy "group")

# --- OCP Microscaling (MX) v1.0 --------------------------------------------------------------------
MX_BLOCK_SIZE = 32  # elements sharing one E8M0 scale, along the reduction (input) dimension
E8M0_BIAS = 127  # scale = 2 ** (byte - 127)
E8M0_NAN = 0xFF  # reserved for NaN; never written

# E2M1 (FP4): 1 sign, 2 exponent (bias 1), 1 mantissa bit; codes 0..7 are the magnitudes below
# (code 1 is the subnormal 0.5). No Inf/NaN; the largest magnitude is 6 = 2**2 * 1.5.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
E2M1_MAX = 6.0
E2M1_SIGN_BIT = 0x8
E2M1_MBITS = 1
E2M1_EMAX = 2  # exponent of the largest normal (6 = 1.5 * 2**2); subtracted from the block exponent

# Quark 0.11 scale_calculation_mode "even": round the FP32 block amax to one mantissa bit by adding
# half an ulp at that precision to the raw bits (carry may bump the exponent), then keep sign+exponent.
EVEN_ROUND_ADD = 1 << (23 - E2M1_MBITS - 1)  # 1 << 21
FP32_SIGN_EXP_MASK = ((1 << 9) - 1) << 23  # 1 sign + 8 exponent bits
FP32_MANT_BITS = 23
FP32_EXP_BIAS = 127
SCALE_EXP_MIN, SCALE_EXP_MAX = -127, 127  # E8M0 range actually written (0xFF excluded)

# FP4 packing: element 2k in the low nibble, 2k+1 in the high nibble (two codes per uint8).
FP4_PER_BYTE = 2

# --- FP8 E4M3 "fn" (no Inf; NaN = 0x7F/0xFF), Quark ptpc_fp8 weight format -------------------------
FP8_E4M3_MAX = 448.0  # 2**8 * 1.75

# --- FP8 block-scaled upstreams (DeepSeek-V3/V3.1/R1, Kimi-K2-Instruct: quantization_config quant_method "fp8") -----
FP8_E4M3_NAN_BITS = 0x7F  # S.1111.111 is NaN in E4M3 "fn" (either sign); every other code is finite
FP8_BLOCK_DEFAULT = (128, 128)  # weight_block_size: one FP32 weight_scale_inv per 128x128 block (edges partial)
UE8M0_SCALE_FMT = "ue8m0"  # DeepSeek-V3.1's scale_fmt: every weight_scale_inv is a power of two

# --- BF16 bit layout (used by the fused INT4 -> MXFP4 path) ----------------------------------------
BF16_MANT_BITS = 7
BF16_EXP_MASK = 0xFF

# The AMD Quark releases whose file-to-file export requant reproduces byte for byte (recipe ``quark_version``,
# ``--quark-version``); requant.formats.table has one format table for each
QUARK_RELEASES = ("0.11", "0.13")
DEFAULT_QUARK = "0.11"  # Quark 0.11.2, which the seed model card pins for serving-stack compatibility
# The compressed-tensors release whose checkpoints requant's compressed-tensors export equals (as llm-compressor 0.14's
# model_free_ptq writes them); its config's "version"
COMPRESSED_TENSORS_VERSION = "0.19.0"
# The NVIDIA Model Optimizer release whose unified Hugging Face export requant's Model Optimizer export equals; its
# hf_quant_config.json's producer version
MODELOPT_VERSION = "0.47.0"
