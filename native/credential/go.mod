module github.com/task-broker/task-broker/native/credential

go 1.26.0
