"""The Flask webhook receiver (gunicorn: `webhook_receiver.app:create_app()`)."""
