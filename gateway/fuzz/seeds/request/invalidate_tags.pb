
catalog"

category:7