
catalog
page:/p/42<h1>hi</h1>"&
surrogate-keyproduct:42 category:7*	text/html