"""Who may call what: TLS credentials (tls.py), API keys and the cluster token (credentials.py), the
server interceptor that checks them (interceptor.py), and the settings both servers take (settings.py)."""
