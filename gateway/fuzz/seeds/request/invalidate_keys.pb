
users

profile:42
settings:42@d