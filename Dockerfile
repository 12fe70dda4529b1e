# mta-serve on a CUDA machine. Build: docker build -t mta-serve .
# Run:   docker run --gpus all -p 8000:8000 mta-serve                      (the embedded default model)
#        docker run --gpus all -p 8000:8000 -v /models:/models mta-serve --model /models/NAME --device cuda
# The base image brings Python, CUDA and a CUDA build of torch; pip keeps that torch (pyproject asks torch>=2.4).
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

WORKDIR /app
COPY pyproject.toml README.md server.py ./
COPY mta_serve ./mta_serve
COPY kernels ./kernels
COPY configs ./configs
RUN pip install --no-cache-dir . && rm -rf /root/.cache

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4).status != 200)"
ENTRYPOINT ["mta-serve", "--host", "0.0.0.0", "--port", "8000"]
