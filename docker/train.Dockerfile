# GPU training image: CUDA torch build (the default PyPI wheels), the package, data_shards, configs, slurm.
#   docker build -f docker/train.Dockerfile -t gan-train .
#   docker run --rm --gpus all --shm-size 8g -v $PWD/data:/app/data -v $PWD/runs:/app/runs gan-train \
#       accelerate launch --multi_gpu --num_processes 8 launch/train.py --config configs/cifar10_cdcgan.yaml --run-dir runs/cdcgan
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /venv
ENV PATH=/venv/bin:$PATH
WORKDIR /app
COPY . .
RUN pip install --no-cache-dir -c constraints.txt .
CMD ["python", "launch/train.py", "--help"]
