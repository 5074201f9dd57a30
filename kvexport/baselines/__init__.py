"""Third-party exports of the same weights, built into kvexport program directories so that
``kvexport bench`` / ``run`` can measure them next to our programs (see ``executorch_llama``)."""
