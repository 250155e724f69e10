module kubetune.invalid/pause

go 1.26
