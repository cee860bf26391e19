import numpy as np, sys
sys.argv = sys.argv
exec(open(__file__.replace("analyze_gate_l2.py", "analyze_gate.py")).read().split("t = time.time()")[0])
n = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
rep("l2norm perclass", *maha(n(ftr), [n(fva), n(fte), n(fw)]))
