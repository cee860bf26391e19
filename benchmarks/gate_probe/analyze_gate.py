import numpy as np, sys, time
from sklearn.covariance import LedoitWolf
from sklearn.metrics import roc_auc_score
from sklearn.decomposition import PCA
a = np.load("/tmp/gate/arrays.npz"); trY = a["trY"]
f = np.load(sys.argv[1]); ftr, fva, fte, fw = f["ftr"], f["fva"], f["fte"], f["fw"]
def maha(ftr, others, kind="perclass"):
    Ws, mus = [], []
    for c in (0, 1):
        X = ftr[trY == c]; mu = X.mean(0)
        C = LedoitWolf().fit(X).covariance_ if kind == "perclass" else None
        Ws.append(np.linalg.cholesky(np.linalg.inv(C))); mus.append(mu)
    return [np.min([(((F - mu) @ W) ** 2).sum(1) for mu, W in zip(mus, Ws)], axis=0) for F in others]
def rep(name, sva, ste, sw):
    thr = np.quantile(sva, 0.99)
    auc = roc_auc_score(np.r_[np.zeros(len(ste)), np.ones(len(sw))], np.r_[ste, sw])
    print(f"{name:30s} auroc={auc:.4f} wild_flag={(sw > thr).mean():.3f} test_pass={(ste <= thr).mean():.4f}", flush=True)
t = time.time()
rep("full perclass", *maha(ftr, [fva, fte, fw]))
for k in (64, 128, 256, 512):
    p = PCA(k, random_state=0).fit(ftr)
    rep(f"pca{k} perclass", *maha(p.transform(ftr), [p.transform(x) for x in (fva, fte, fw)]))
# l2-normalised features
n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
rep("l2norm perclass", *maha(n(ftr), [n(fva), n(fte), n(fw)]))
# kNN cosine (k=10) on 6000 train
def knn(F, k=10):
    s = n(F) @ n(ftr).T
    return -np.sort(s, axis=1)[:, -k]
rep("knn10 cosine", knn(fva), knn(fte), knn(fw))
print(time.time() - t)
