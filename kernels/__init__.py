"""mta-serve's Triton kernels, installed as the subpackage `mta_serve.kernels`.

The folder is named `kernels/` at the top of the repository but is never importable as a top-level `kernels`
package (a PyPI package of that name exists): pyproject.toml maps it into `mta_serve`, and the repository root
is not put on sys.path by the tests. Import it as `mta_serve.kernels`.
"""
