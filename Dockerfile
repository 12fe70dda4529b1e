# mta-serve: serves the embedded default model on port 8000; pass `--model /models/NAME` (mounted) for yours.
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md server.py ./
COPY mta_serve ./mta_serve
COPY kernels ./kernels
COPY configs ./configs
RUN pip install --no-cache-dir .

EXPOSE 8000
ENTRYPOINT ["mta-serve", "--host", "0.0.0.0", "--port", "8000"]
