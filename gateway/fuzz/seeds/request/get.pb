
users
profile:42
fieldemail 