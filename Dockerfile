# mta-serve on a CUDA machine. Build: docker build -t mta-serve .
# Run:   docker run --gpus all -p 8000:8000 mta-serve                      (the embedded default model)
#        docker run --gpus all -p 8000:8000 -v /models:/models mta-serve --model /models/NAME
# torch from PyPI: on Linux x86_64 its wheel is a CUDA build that brings the CUDA libraries and the matching
# Triton as pip packages, so the host needs only the NVIDIA driver (580 or later: 2.11.0's wheel is built for
# CUDA 13.0) and container toolkit. 2.11.0 (Triton 3.6.0) is what the GPU tests and benchmarks ran with.
# Triton compiles a small launcher with the C compiler when it first builds a kernel, hence gcc.
FROM python:3.12-slim

RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
RUN pip install --no-cache-dir torch==2.11.0

WORKDIR /app
COPY pyproject.toml README.md server.py ./
COPY mta_serve ./mta_serve
COPY kernels ./kernels
COPY configs ./configs
RUN pip install --no-cache-dir . && rm -rf /root/.cache

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
# --device cuda: the CLI's default is the CPU; a later --device in `docker run`'s arguments overrides it
ENTRYPOINT ["mta-serve", "--host", "0.0.0.0", "--port", "8000", "--device", "cuda"]
