"""Vertex AI training jobs and Cloud Run services, through the Google SDKs (imported lazily)."""
