"""The stages of `runner.Evaluation`, by job: baselines, Persona-Mux, embedding, judging (one mixin each)."""
