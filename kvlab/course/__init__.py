"""The course machinery: run every notebook, generate student notebooks, grade submissions.

- `python -m kvlab.course.run_course`  execute the student notebooks with papermill (`make course`)
- `python -m kvlab.course.assign`      masters -> student notebooks + autograders (`make students`)
- `python -m kvlab.course.grade DIR`   grade a folder of submissions locally (`make grade`)
"""
