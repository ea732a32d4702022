"""Who may talk to the manager: the PKI (pki.py), peer identities from certificates (identity.py) and the admin
roles (roles.py)."""
