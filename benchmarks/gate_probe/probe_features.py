import time, numpy as np, torch, torch.nn.functional as F, sys
torch.set_num_threads(1)
sys.path.insert(0, "/work/main")
from transformers import AutoModel
from hub_models import BayesFakeImageProcessor
from train.data import decode_processor, load_splits, raw_splits, decode_images
from train.features import preprocess_uint8
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score

m = AutoModel.from_pretrained("/work/main/hub_models/effnetlite0-linear", trust_remote_code=True).eval()
p32 = decode_processor(m.config, 32)
splits = load_splits("../shared/data/cifake", p32, 0.05, 0)
rng = np.random.default_rng(0)
tr_idx = rng.choice(len(splits["train"][1]), 6000, replace=False)
trX, trY = splits["train"][0][tr_idx], splits["train"][1][tr_idx]
vaX, vaY = splits["val"]
teX, teY = splits["test"]
wild = raw_splits("../shared/data/wild")
witems = wild["train"] + wild["test"]
(w32, wY), _ = decode_images(witems, p32, "wild32")
p128 = BayesFakeImageProcessor.from_config(m.config)
(w128, _), _ = decode_images(witems, p128, "wild128")
np.savez("/tmp/gate/arrays.npz", trX=trX, trY=trY, vaX=vaX, vaY=vaY, teX=teX, teY=teY, w32=w32, wY=wY, w128=w128)

@torch.no_grad()
def feats_pil(X, direct=False):
    out = []
    for i in range(0, len(X), 256):
        x = p128.normalize_uint8(torch.from_numpy(X[i:i+256]).permute(0,3,1,2)) if direct else preprocess_uint8(p128, X[i:i+256])
        out.append(m.backbone(x).numpy())
    return np.concatenate(out)

@torch.no_grad()
def feats_torch(X, size):
    out = []
    for i in range(0, len(X), 256):
        x = torch.from_numpy(X[i:i+256]).permute(0,3,1,2).float() / 255
        x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False).clamp(0, 1)
        x = (x - 0.5) / 0.5
        out.append(m.backbone(x).numpy())
    return np.concatenate(out)

def gate_eval(name, ftr, fva, fte, fw):
    t0 = time.time()
    res = {}
    for kind in ("perclass", "shared"):
        mus, precs = [], []
        for c in (0, 1):
            X = ftr[trY == c]
            lw = LedoitWolf().fit(X if kind == "perclass" else ftr - np.where(trY[:, None] == 1, ftr[trY == 1].mean(0), ftr[trY == 0].mean(0)))
            mus.append(X.mean(0)); precs.append(lw.precision_)
        def score(F_):
            d = [np.einsum("nd,de,ne->n", F_ - mu, P, F_ - mu) for mu, P in zip(mus, precs)]
            return np.min(d, axis=0)
        sva, ste, sw = score(fva), score(fte), score(fw)
        thr = np.quantile(sva, 0.99)
        auc = roc_auc_score(np.r_[np.zeros(len(ste)), np.ones(len(sw))], np.r_[ste, sw])
        res[kind] = dict(auroc=round(auc, 4), wild_flag=round(float((sw > thr).mean()), 3), test_pass=round(float((ste <= thr).mean()), 4))
    print(name, res, f"{time.time()-t0:.0f}s", flush=True)

for name, fn in [("pil128", lambda X, d=False: feats_pil(X, d)), ("torch128", lambda X, d=False: feats_torch(X, 128)), ("torch64", lambda X, d=False: feats_torch(X, 64)), ("torch96", lambda X, d=False: feats_torch(X, 96))]:
    t0 = time.time()
    ftr, fva, fte = fn(trX), fn(vaX), fn(teX)
    fw = feats_pil(w128, True) if name == "pil128" else fn(w32)
    dt = time.time() - t0
    n = len(trX)+len(vaX)+len(teX)+len(w32)
    print(name, f"{n/dt:.0f} img/s 1 thread", flush=True)
    np.savez(f"/tmp/gate/f_{name}.npz", ftr=ftr, fva=fva, fte=fte, fw=fw)
    gate_eval(name, ftr, fva, fte, fw)
    if name == "pil128":
        # also the wild images as the CNN sees them (32 px), upsampled by PIL like CIFAKE
        gate_eval("pil128-wild-at-32", ftr, fva, fte, feats_pil(w32))
