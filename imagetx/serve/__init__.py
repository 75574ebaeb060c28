"""`imagetx serve`: a local web page and HTTP API over the models given at start (docs/serve.md).

server.py: the command (ServeConfig, run) and the check of the `serve` extra; models.py: the
models, loaded once, under the names requests use; requests.py: every parameter and upload
checked before any work; jobs.py: the bounded queue, cancellation when a client leaves, and
server-sent events; work.py: what is computed (samples, completions, super-resolutions,
likelihoods, the bits maps, the streamed frames); app.py: the Starlette app and its routes;
static/: the page (HTML, CSS, JavaScript: no build step, nothing fetched from elsewhere).
Only server.py may be imported without starlette installed."""
