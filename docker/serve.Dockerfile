# CPU serving image: the package, CPU-only torch, FastAPI + uvicorn, onnxruntime.
#   docker build -f docker/serve.Dockerfile -t gan-serve .
#   docker run --rm -p 8000:8000 -v $PWD/artifacts/cdcgan:/model:ro gan-serve --artifact /model
#   docker run --rm -p 8000:8000 -v $PWD/runs/cdcgan:/run:ro gan-serve --run /run
FROM python:3.11-slim
WORKDIR /app
COPY constraints.txt pyproject.toml README.md ./
COPY gan gan
COPY data_shards data_shards
COPY launch launch
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu "torch==2.11.0" "torchvision==0.26.0" \
 && grep -v -E '^(torch|torchvision|triton|nvidia-|cuda-)' constraints.txt > /tmp/c.txt \
 && pip install --no-cache-dir -c /tmp/c.txt ".[serve]"
EXPOSE 8000
HEALTHCHECK CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health')"
ENTRYPOINT ["python", "launch/serve.py", "--host", "0.0.0.0", "--port", "8000"]
