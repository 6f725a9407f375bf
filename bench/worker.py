"""One backend measured in its own process (lathe bench --isolate). Argument: a JSON job;
writes rows.json and emb.safetensors into job["out"]."""
import json
import os
import sys


def main():
    job = json.loads(sys.argv[1])
    from safetensors.torch import save_file

    from lathe.bench.backends import Spec
    from lathe.bench.encoder import measure

    rows, emb = measure(Spec(**job["spec"]), job["model_dir"], job["batches"], job["seq"], job["min_runs"],
                        job["min_seconds"], job["max_seconds"], job["threads"])
    with open(os.path.join(job["out"], "rows.json"), "w") as f:
        json.dump(rows, f)
    save_file({"emb": emb.contiguous()}, os.path.join(job["out"], "emb.safetensors"))


if __name__ == "__main__":
    main()
