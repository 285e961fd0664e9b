"""The ServerApp: FedkernStrategy (a robust rule over the decoded compressed updates), with the
server-side accuracy on held-out digits after every round."""

from __future__ import annotations

from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from fedkern.integrations.flower import FedkernStrategy
from fedkern_flower_app import task

app = ServerApp()
#: the ``Result`` of every run of this process (for programmatic runs and tests)
RESULTS: list = []


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = task.config(context)
    strategy = FedkernStrategy(rule=str(cfg["rule"]), f=int(cfg["byzantine-tolerated"]),
                               fraction_evaluate=0.0, device="cpu")  # fmt: skip
    inputs, labels = task.test_set()

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net = task.model()
        net.load_state_dict(arrays.to_torch_state_dict())
        return MetricRecord({"accuracy": task.accuracy(net, inputs, labels)})

    result = strategy.start(grid=grid, initial_arrays=ArrayRecord(task.model().state_dict()),
                            num_rounds=int(cfg["num-server-rounds"]),
                            evaluate_fn=evaluate)  # fmt: skip
    final = result.evaluate_metrics_serverapp[max(result.evaluate_metrics_serverapp)]
    print(f"fedkern-flower-app: final test accuracy {final['accuracy']:.4f}")
    RESULTS.append(result)
