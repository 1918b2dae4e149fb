#!/usr/bin/env python3
# Flower simulation of the same task as `tessera devnet --train-demo`:
# MLP 64-64-10 in NumPy, SGD 0.1, batches of 32, 2 local epochs, 10 IID
# clients (every client every round), 150 rounds, digits split 80/20.
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import numpy as np
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
import flwr as fl
from flwr.common import ndarrays_to_parameters, Context
from flwr.client import NumPyClient, ClientApp
from flwr.server import ServerApp, ServerConfig, ServerAppComponents
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation

ROUNDS = int(sys.argv[1]) if len(sys.argv) > 1 else 150
X, y = load_digits(return_X_y=True)
X = (X / 16.0).astype(np.float32); y = y.astype(np.int64)
Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.2, random_state=42)
rng = np.random.default_rng(7)
order = rng.permutation(len(Xtr))
shards = np.array_split(order, 10)

def init(seed=1):
    r = np.random.default_rng(seed)
    l1 = np.sqrt(6 / (64 + 64)); l2 = np.sqrt(6 / (64 + 10))
    return [r.uniform(-l1, l1, (64, 64)).astype(np.float32), np.zeros(64, np.float32),
            r.uniform(-l2, l2, (64, 10)).astype(np.float32), np.zeros(10, np.float32)]

def forward(w, x):
    h = np.maximum(x @ w[0] + w[1], 0)
    z = h @ w[2] + w[3]
    z = z - z.max(1, keepdims=True)
    p = np.exp(z); p /= p.sum(1, keepdims=True)
    return h, p

def train(w, x, y, epochs, seed):
    w = [a.copy() for a in w]
    r = np.random.default_rng(seed)
    for _ in range(epochs):
        idx = r.permutation(len(x))
        for s in range(0, len(x), 32):
            b = idx[s:s + 32]; xb, yb = x[b], y[b]
            h, p = forward(w, xb)
            g = p.copy(); g[np.arange(len(b)), yb] -= 1; g /= len(b)
            gw2 = h.T @ g; gb2 = g.sum(0)
            gh = g @ w[2].T; gh[h <= 0] = 0
            gw1 = xb.T @ gh; gb1 = gh.sum(0)
            for a, d in zip(w, [gw1, gb1, gw2, gb2]):
                a -= 0.1 * d
    return w

def accuracy(w):
    return float((forward(w, Xte)[1].argmax(1) == yte).mean())

class Client(NumPyClient):
    def __init__(self, cid): self.cid = cid
    def fit(self, parameters, config):
        x, yy = Xtr[shards[self.cid]], ytr[shards[self.cid]]
        w = train(parameters, x, yy, 2, int(config.get("round", 0)) * 100 + self.cid)
        return w, len(x), {}

def client_fn(context: Context):
    return Client(int(context.node_config["partition-id"])).to_client()

history = []
def evaluate(rnd, parameters, config):
    acc = accuracy(parameters)
    history.append(acc)
    return 0.0, {"accuracy": acc}

def server_fn(context: Context):
    strategy = FedAvg(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=10,
                      min_available_clients=10, initial_parameters=ndarrays_to_parameters(init()),
                      evaluate_fn=evaluate, on_fit_config_fn=lambda r: {"round": r})
    return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=ROUNDS))

t = time.time()
run_simulation(server_app=ServerApp(server_fn=server_fn), client_app=ClientApp(client_fn=client_fn),
               num_supernodes=10, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
secs = time.time() - t
central = train(init(), Xtr, ytr, 2 * ROUNDS, 1)
print(json.dumps({"flower": fl.__version__, "rounds": ROUNDS, "accuracy": history[-1] if history else None,
                  "centralized_accuracy": accuracy(central), "seconds": secs,
                  "seconds_per_round": secs / ROUNDS,
                  "rounds_to_95": next((i for i, a in enumerate(history) if a >= 0.95), None)}))
