"""Real test peers: a private redis-server, simulated WhatsApp instance processes, Node servers."""
