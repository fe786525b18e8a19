import sys, torch, json
sys.path.insert(0, ".")
from infra.gpu_kernel_check import random_int4
from requant.formats.int4 import dequantize_int4
from requant.formats.mxfp4 import shared_exponent, e2m1_codes
from requant.constants import MX_BLOCK_SIZE
packed, scale = random_int4(512, 1024, seed=len("all_scale_classes"), extreme=True)
out = {}
w_c = dequantize_int4(packed, scale, 1024); w_g = dequantize_int4(packed.cuda(), scale.cuda(), 1024).cpu()
out["dequant_eq"] = torch.equal(w_c.view(torch.int16), w_g.view(torch.int16))
x_c = w_c.float().reshape(512, -1, 32); x_g = w_g.float().cuda().reshape(512, -1, 32)
e_c = shared_exponent(x_c.abs().amax(-1)); e_g = shared_exponent(x_g.abs().amax(-1)).cpu()
out["exp_eq"] = torch.equal(e_c, e_g)
p_c = torch.exp2(e_c.float()); p_g = torch.exp2(e_g.cuda().float()).cpu()
bad = (p_c.view(torch.int32) != p_g.view(torch.int32))
out["exp2_bad"] = int(bad.sum()); out["exp2_bad_exps"] = sorted(set(e_c[bad].tolist()))[:10]
s_c = x_c / p_c.unsqueeze(-1); s_g = (x_g / p_g.cuda().unsqueeze(-1)).cpu()
bad = s_c.view(torch.int32) != s_g.view(torch.int32)
out["div_bad"] = int(bad.sum())
if out["div_bad"]:
    i = bad.nonzero()[0].tolist(); out["div_example"] = [x_c[tuple(i)].item(), p_c[tuple(i[:2])].item(), s_c[tuple(i)].item(), s_g[tuple(i)].item()]
c_c = e2m1_codes(s_c); c_g = e2m1_codes(s_c.cuda()).cpu()
out["codes_bad"] = int((c_c != c_g).sum())
print(json.dumps(out))
