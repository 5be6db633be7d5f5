


usersa


usersb

bad:nsc