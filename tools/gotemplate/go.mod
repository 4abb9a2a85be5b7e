module tunery/gotemplate

go 1.19
