//! Name lists, grouped by origin so that a generated person gets a coherent
//! family name, given name and (sometimes) preferred language.
//!
//! Together the lists hold well over 500 distinct family names and well over
//! 500 distinct given names, including accented spellings, so that large
//! populations contain many distinct names (useful for search benchmarks).

use crate::time::Tz;

/// One group of names that belong together.
pub(crate) struct Origin {
    /// Relative frequency of the group in the generated population.
    pub weight: u32,
    /// BCP-47 code and display of the language the group may prefer.
    pub language: (&'static str, &'static str),
    pub family: &'static [&'static str],
    pub male: &'static [&'static str],
    pub female: &'static [&'static str],
}

pub(crate) const ENGLISH: (&str, &str) = ("en-US", "English (United States)");

#[rustfmt::skip]
pub(crate) static ORIGINS: &[Origin] = &[
    // English, Scottish, Welsh, Irish and general American names.
    Origin {
        weight: 44,
        language: ENGLISH,
        family: &[
            "Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson",
            "Anderson", "Taylor", "Thomas", "Moore", "Jackson", "Martin", "Lee", "Thompson",
            "White", "Harris", "Clark", "Lewis", "Robinson", "Walker", "Young", "Allen", "King",
            "Wright", "Scott", "Hill", "Green", "Adams", "Baker", "Nelson", "Carter",
            "Mitchell", "Roberts", "Turner", "Phillips", "Campbell", "Parker", "Evans",
            "Edwards", "Collins", "Stewart", "Morris", "Rogers", "Reed", "Cook", "Morgan",
            "Bell", "Murphy", "Bailey", "Cooper", "Richardson", "Cox", "Howard", "Ward",
            "Peterson", "Gray", "James", "Watson", "Brooks", "Kelly", "Sanders", "Price",
            "Bennett", "Wood", "Barnes", "Ross", "Henderson", "Coleman", "Jenkins", "Perry",
            "Powell", "Long", "Patterson", "Hughes", "Washington", "Butler", "Simmons",
            "Foster", "Bryant", "Alexander", "Russell", "Griffin", "Hayes", "Myers", "Ford",
            "Hamilton", "Graham", "Sullivan", "Wallace", "Woods", "Cole", "West", "Jordan",
            "Owens", "Reynolds", "Fisher", "Ellis", "Harrison", "Gibson", "McDonald",
            "Marshall", "Wells", "Simpson", "Stevens", "Tucker", "Porter", "Hunter", "Hicks",
            "Crawford", "Henry", "Boyd", "Mason", "Kennedy", "Warren", "Dixon", "Burns",
            "Gordon", "Shaw", "Holmes", "Rice", "Robertson", "Hunt", "Black", "Daniels",
            "Palmer", "Mills", "Grant", "Knight", "Ferguson", "Rose", "Stone", "Hawkins",
            "Dunn", "Perkins", "Hudson", "Spencer", "Gardner", "Stephens", "Payne", "Pierce",
            "Berry", "Matthews", "Arnold", "Wagner", "Willis", "Ray", "Watkins", "Olson",
            "Carroll", "Duncan", "Snyder", "Hart", "Cunningham", "Bradley", "Lane", "Andrews",
            "Harper", "Fox", "Riley", "Armstrong", "Carpenter", "Weaver", "Greene", "Lawrence",
            "Elliott", "Chavis", "Sims", "Austin", "Peters", "Kelley", "Franklin", "Lawson",
            "Fields", "Ryan", "Schmidt", "Carr", "Castillo", "Wheeler", "Chapman", "Montgomery",
            "Richards", "Williamson", "Johnston", "Banks", "Meyer", "Bishop", "McCoy", "Howell",
            "Morrison", "Hansen", "Harvey", "Little", "Burton", "Stanley", "George", "Jacobs",
            "Reid", "Fuller", "Lynch", "Dean", "Gilbert", "Garrett", "Romero", "Welch",
            "Larson", "Frazier", "Burke", "Hanson", "Day", "Moreno", "Bowman", "Fowler",
            "O'Brien", "O'Connor", "O'Neill", "Gallagher", "Fitzgerald", "MacLeod",
            "Kirkpatrick", "Donnelly", "Brennan", "Quinn", "Doyle", "Byrne", "McCarthy",
            "Kavanagh", "Llewellyn", "Vaughan", "Pritchard", "Griffiths", "Blackwood",
            "Whitfield", "Ashford", "Thornton", "Langley", "Pemberton", "Hargreaves", "Winslow",
            "Calloway", "Merriweather",
        ],
        male: &[
            "James", "John", "Robert", "Michael", "William", "David", "Richard", "Joseph",
            "Thomas", "Charles", "Christopher", "Daniel", "Matthew", "Anthony", "Mark",
            "Donald", "Steven", "Paul", "Andrew", "Joshua", "Kenneth", "Kevin", "Brian",
            "George", "Timothy", "Ronald", "Edward", "Jason", "Jeffrey", "Ryan", "Jacob",
            "Gary", "Nicholas", "Eric", "Jonathan", "Stephen", "Larry", "Justin", "Scott",
            "Brandon", "Benjamin", "Samuel", "Gregory", "Alexander", "Frank", "Patrick",
            "Raymond", "Jack", "Dennis", "Jerry", "Tyler", "Aaron", "Henry", "Adam", "Douglas",
            "Nathan", "Peter", "Zachary", "Kyle", "Walter", "Harold", "Jeremy", "Ethan", "Carl",
            "Keith", "Roger", "Gerald", "Christian", "Terry", "Sean", "Arthur", "Austin",
            "Noah", "Lawrence", "Jesse", "Joe", "Bryan", "Billy", "Jordan", "Albert", "Dylan",
            "Bruce", "Willie", "Gabriel", "Alan", "Wayne", "Elijah", "Randy", "Vincent",
            "Mason", "Roy", "Ralph", "Bobby", "Russell", "Bradley", "Philip", "Eugene", "Liam",
            "Logan", "Owen", "Caleb", "Hunter", "Wyatt", "Connor", "Declan", "Malcolm",
            "Darnell", "DeShawn", "Tyrone", "Marcus", "Jamal", "Terrence", "Reginald", "Cedric",
            "Clarence", "Elliott", "Graham",
        ],
        female: &[
            "Mary", "Patricia", "Jennifer", "Linda", "Elizabeth", "Barbara", "Susan", "Jessica",
            "Sarah", "Karen", "Lisa", "Nancy", "Betty", "Margaret", "Sandra", "Ashley",
            "Kimberly", "Emily", "Donna", "Michelle", "Carol", "Amanda", "Dorothy", "Melissa",
            "Deborah", "Stephanie", "Rebecca", "Sharon", "Laura", "Cynthia", "Kathleen", "Amy",
            "Angela", "Shirley", "Anna", "Brenda", "Pamela", "Emma", "Nicole", "Helen",
            "Samantha", "Katherine", "Christine", "Debra", "Rachel", "Carolyn", "Janet",
            "Catherine", "Heather", "Diane", "Ruth", "Julie", "Olivia", "Joyce", "Virginia",
            "Victoria", "Kelly", "Lauren", "Christina", "Joan", "Evelyn", "Judith", "Megan",
            "Andrea", "Cheryl", "Hannah", "Jacqueline", "Martha", "Gloria", "Teresa", "Ann",
            "Madison", "Frances", "Kathryn", "Janice", "Jean", "Abigail", "Alice", "Judy",
            "Sophia", "Grace", "Denise", "Amber", "Doris", "Marilyn", "Danielle", "Beverly",
            "Isabella", "Theresa", "Diana", "Natalie", "Brittany", "Charlotte", "Marie",
            "Kayla", "Alexis", "Lori", "Ava", "Mia", "Harper", "Ella", "Scarlett", "Zoë",
            "Chloe", "Penelope", "Layla", "Riley", "Nora", "Lillian", "Aubrey", "Brooklyn",
            "Savannah", "Aaliyah", "Ebony", "Latoya", "Tamika", "Keisha", "Imani", "Shanice",
            "Siobhan", "Niamh", "Bridget", "Maeve", "Fiona", "Eileen", "Gwendolyn", "Rhiannon",
            "Imogen",
        ],
    },
    // Spanish, Mexican, Central and South American names.
    Origin {
        weight: 17,
        language: ("es", "Spanish"),
        family: &[
            "García", "Rodríguez", "Martínez", "Hernández", "López", "González", "Pérez",
            "Sánchez", "Ramírez", "Torres", "Flores", "Rivera", "Gómez", "Díaz", "Reyes",
            "Morales", "Cruz", "Ortiz", "Gutiérrez", "Chávez", "Ramos", "Ruiz", "Mendoza",
            "Álvarez", "Vásquez", "Jiménez", "Aguirre", "Pacheco", "Herrera", "Medina",
            "Aguilar", "Vargas", "Castro", "Guzmán", "Fernández", "Muñoz", "Núñez", "Peña",
            "Ibáñez", "Salazar", "Delgado", "Soto", "Contreras", "Luna", "Ríos", "Estrada",
            "Mejía", "Orozco", "Domínguez", "Cabrera", "Navarro", "Campos", "Vega", "Acosta",
            "Figueroa", "Fuentes", "Cervantes", "Sandoval", "Espinoza", "Cortés", "Juárez",
            "Valdez", "Rosales", "Barrera", "Zamora", "Ávila", "Serrano", "Villanueva",
            "Quintero", "Ochoa", "Montoya", "Cárdenas", "Benítez", "Escobar", "Padilla",
            "Maldonado", "Galván", "Trujillo", "Bermúdez", "Carrasco", "Paredes", "Salinas",
            "Velázquez", "Arellano", "Alarcón", "Bautista", "Calderón", "Zúñiga",
        ],
        male: &[
            "José", "Luis", "Juan", "Carlos", "Jorge", "Miguel", "Jesús", "Francisco",
            "Antonio", "Alejandro", "Manuel", "Pedro", "Ricardo", "Fernando", "Javier",
            "Roberto", "Eduardo", "Sergio", "Raúl", "Andrés", "Diego", "Mateo", "Santiago",
            "Sebastián", "Emiliano", "Héctor", "Arturo", "Rubén", "Óscar", "Ramón", "Joaquín",
            "Rafael", "Guillermo", "Ignacio", "Gustavo", "Alfonso", "Enrique", "Martín",
            "Ángel", "Adrián", "Hugo", "Iván", "Julián", "Tomás", "Gerardo", "Rodrigo",
        ],
        female: &[
            "María", "Guadalupe", "Rosa", "Ana", "Carmen", "Sofía", "Valentina", "Camila",
            "Lucía", "Isabel", "Gabriela", "Daniela", "Fernanda", "Ximena", "Paola", "Adriana",
            "Verónica", "Mónica", "Alejandra", "Claudia", "Patricia", "Elena", "Teresa",
            "Beatriz", "Silvia", "Leticia", "Yolanda", "Marisol", "Lourdes", "Dolores", "Pilar",
            "Inés", "Luz", "Esperanza", "Araceli", "Itzel", "Renata", "Jimena", "Martina",
            "Regina", "Natalia", "Mariana", "Catalina", "Rocío", "Belén",
        ],
    },
    // German, Austrian, Swiss and Dutch names.
    Origin {
        weight: 5,
        language: ("de", "German"),
        family: &[
            "Müller", "Schmitt", "Schneider", "Fischer", "Weber", "Schubert", "Roth", "Becker",
            "Schulz", "Hoffmann", "Schäfer", "Koch", "Bauer", "Richter", "Klein", "Wolf",
            "Schröder", "Neumann", "Schwarz", "Zimmermann", "Braun", "Krüger", "Hofmann",
            "Hartmann", "Lange", "Werner", "Krause", "Lehmann", "Köhler", "Maier", "Huber",
            "Kaiser", "Fuchs", "Brandt", "Jäger", "Groß", "Vogel", "Friedrich", "Günther",
            "Keller", "Böhm", "Dietrich", "Van der Berg", "De Vries", "Jansen", "Bakker",
            "Visser", "Smit", "Janssen", "Van Dijk",
        ],
        male: &[
            "Hans", "Jürgen", "Klaus", "Stefan", "Wolfgang", "Andreas", "Dieter", "Uwe",
            "Matthias", "Lukas", "Felix", "Maximilian", "Jonas", "Leon", "Florian", "Tobias",
            "Günter", "Horst", "Sven", "Dirk", "Jan", "Pieter", "Willem", "Joost",
        ],
        female: &[
            "Ursula", "Monika", "Sabine", "Petra", "Renate", "Gisela", "Ingrid", "Brigitte",
            "Heike", "Katrin", "Anja", "Julia", "Lena", "Leonie", "Hannelore", "Jutta", "Greta",
            "Lotte", "Mareike", "Sanne", "Annelies", "Femke", "Lieselotte", "Käthe",
        ],
    },
    // Italian names.
    Origin {
        weight: 4,
        language: ("it", "Italian"),
        family: &[
            "Rossi", "Russo", "Ferrari", "Esposito", "Bianchi", "Romano", "Colombo", "Ricci",
            "Marino", "Greco", "Bruno", "Gallo", "Conti", "De Luca", "Mancini", "Costa",
            "Giordano", "Rizzo", "Lombardi", "Moretti", "Barbieri", "Fontana", "Santoro",
            "Mariani", "Rinaldi", "Caruso", "Ferrara", "Galli", "Martini", "Leone", "Longo",
            "Gentile", "Martinelli", "Vitale", "Lombardo", "Serra", "Coppola", "De Santis",
            "D'Angelo", "Marchetti", "Parisi", "Villa", "Conte", "Ferraro", "Fabbri", "Bianco",
            "Marini", "Grasso", "Valentini", "Messina",
        ],
        male: &[
            "Giuseppe", "Giovanni", "Francesco", "Salvatore", "Luigi", "Marco", "Alessandro",
            "Lorenzo", "Matteo", "Leonardo", "Riccardo", "Paolo", "Vincenzo", "Nicola",
            "Stefano", "Massimo", "Fabio", "Enzo", "Carmine", "Niccolò", "Gianluca", "Domenico",
        ],
        female: &[
            "Giulia", "Francesca", "Chiara", "Alessia", "Federica", "Giorgia", "Aurora",
            "Ginevra", "Beatrice", "Alessandra", "Antonella", "Rosaria", "Giovanna", "Concetta",
            "Serena", "Elisa", "Paola", "Simona", "Lucrezia", "Carla", "Noemi", "Ilaria",
        ],
    },
    // French and French-Canadian names.
    Origin {
        weight: 2,
        language: ("fr", "French"),
        family: &[
            "Dubois", "Durand", "Lefebvre", "Leroy", "Moreau", "Laurent", "Simon", "Michel",
            "Lefèvre", "Mercier", "Dupont", "Lambert", "Bonnet", "François", "Girard",
            "Rousseau", "Fournier", "Morel", "Fontaine", "Chevalier", "Robin", "Gauthier",
            "Tremblay", "Gagnon", "Bouchard", "Côté", "Pelletier", "Bélanger", "Lévesque",
            "Bergeron", "Thériault", "Després", "Benoît",
        ],
        male: &[
            "François", "Jean-Pierre", "Pierre", "Jacques", "Michel", "Philippe", "Olivier",
            "Nicolas", "Étienne", "Julien", "Mathieu", "Théo", "Sébastien", "Benoît", "Rémi",
            "Gaël", "Loïc", "Jérôme",
        ],
        female: &[
            "Renée", "Hélène", "Chloé", "Élodie", "Camille", "Margaux", "Amélie", "Océane",
            "Léa", "Manon", "Aurélie", "Céline", "Sylvie", "Geneviève", "Josée", "Mélanie",
            "Anaïs", "Noémie",
        ],
    },
    // Polish, Czech, Ukrainian and other Central European names.
    Origin {
        weight: 3,
        language: ("pl", "Polish"),
        family: &[
            "Nowak", "Kowalski", "Wiśniewski", "Wójcik", "Kowalczyk", "Kamiński", "Lewandowski",
            "Zieliński", "Szymański", "Woźniak", "Dąbrowski", "Kozłowski", "Jankowski", "Mazur",
            "Kwiatkowski", "Krawczyk", "Piotrowski", "Grabowski", "Pawłowski", "Michalski",
            "Zając", "Wróbel", "Wałęsa", "Sobczak", "Nowakowska", "Dvořák", "Novák", "Svoboda",
            "Procházka", "Černý", "Kovalenko", "Shevchenko", "Bondarenko", "Tkachenko",
            "Horváth", "Nagy",
        ],
        male: &[
            "Łukasz", "Piotr", "Krzysztof", "Tomasz", "Paweł", "Marcin", "Michał", "Jakub",
            "Wojciech", "Kacper", "Bartosz", "Grzegorz", "Jiří", "Tomáš", "Oleksandr", "Taras",
            "László",
        ],
        female: &[
            "Agnieszka", "Małgorzata", "Katarzyna", "Joanna", "Magdalena", "Ewa", "Zofia",
            "Alicja", "Wiktoria", "Dorota", "Barbora", "Zuzana", "Kateřina", "Oksana", "Olena",
            "Irena", "Krisztina",
        ],
    },
    // Chinese names (pinyin and common Cantonese spellings).
    Origin {
        weight: 4,
        language: ("zh", "Chinese"),
        family: &[
            "Wang", "Li", "Zhang", "Liu", "Chen", "Yang", "Huang", "Zhao", "Wu", "Zhou", "Xu",
            "Sun", "Ma", "Zhu", "Hu", "Guo", "He", "Gao", "Lin", "Luo", "Zheng", "Liang", "Xie",
            "Song", "Tang", "Han", "Feng", "Deng", "Cao", "Peng", "Zeng", "Xiao", "Tian", "Dong",
            "Pan", "Yuan", "Cai", "Jiang", "Yu", "Du", "Wong", "Chan", "Leung", "Cheung", "Lau",
            "Ho", "Tsang", "Kwok", "Yip", "Chow",
        ],
        male: &[
            "Wei", "Jun", "Hao", "Jie", "Lei", "Ming", "Qiang", "Yong", "Jian", "Tao", "Zhiwei",
            "Haoran", "Yichen", "Zihao", "Junjie", "Wenbo", "Xiaoming", "Kai", "Chun", "Bo",
            "Longwei", "Guang",
        ],
        female: &[
            "Fang", "Na", "Xiuying", "Jing", "Min", "Yan", "Hui", "Ling", "Xin", "Mei", "Yuxi",
            "Zixuan", "Xinyi", "Yutong", "Shu", "Qing", "Lan", "Ying", "Xiaoyu", "Jiayi", "Ruoxi",
            "Meiling",
        ],
    },
    // Vietnamese names.
    Origin {
        weight: 2,
        language: ("vi", "Vietnamese"),
        family: &[
            "Nguyễn", "Nguyen", "Trần", "Tran", "Lê", "Phạm", "Pham", "Hoàng", "Huỳnh", "Phan",
            "Vũ", "Võ", "Đặng", "Bùi", "Đỗ", "Hồ", "Ngô", "Dương", "Lý", "Truong", "Vo", "Dang",
            "Bui", "Do",
        ],
        male: &[
            "Minh", "Anh", "Huy", "Khoa", "Bảo", "Duy", "Quang", "Tuấn", "Phúc", "Long", "Thành",
            "Dũng", "Hùng", "Nam", "Vinh", "Khang",
        ],
        female: &[
            "Linh", "Thảo", "Ngọc", "Trang", "Hương", "Hoa", "Mai", "Phương", "Thu", "Vy", "Nhung",
            "Hạnh", "Quyên", "Diệp", "Tuyết", "Yến",
        ],
    },
    // Korean names.
    Origin {
        weight: 2,
        language: ("ko", "Korean"),
        family: &[
            "Kim", "Ko", "Park", "Choi", "Jung", "Kang", "Cho", "Yoon", "Jang", "Lim", "Bae", "Oh",
            "Seo", "Shin", "Kwon", "Hwang", "Ahn", "Ryu", "Jeon", "Hong", "Moon", "Baek", "Yoo",
            "Nam",
        ],
        male: &[
            "Min-jun", "Seo-jun", "Do-yun", "Ji-ho", "Ha-jun", "Joon-ho", "Sung-min",
            "Hyun-woo", "Dong-hyun", "Jae-won", "Tae-yang", "Seung-ho", "Young-soo", "Jin-woo",
            "Kyung-soo",
        ],
        female: &[
            "Seo-yeon", "Ji-woo", "Ha-eun", "Min-seo", "Soo-ah", "Ji-yeon", "Eun-ji", "Hye-jin",
            "Yoo-na", "Da-eun", "Su-bin", "Na-rae", "Mi-kyung", "Young-hee", "Chae-won",
        ],
    },
    // Indian and South Asian names.
    Origin {
        weight: 4,
        language: ("hi", "Hindi"),
        family: &[
            "Patel", "Shah", "Singh", "Kumar", "Sharma", "Gupta", "Reddy", "Rao", "Desai",
            "Mehta", "Iyer", "Nair", "Menon", "Pillai", "Chaudhary", "Joshi", "Agarwal",
            "Banerjee", "Chatterjee", "Mukherjee", "Das", "Bose", "Sen", "Verma", "Malhotra",
            "Kapoor", "Khanna", "Bhatt", "Trivedi", "Pandey", "Mishra", "Srinivasan",
            "Subramanian", "Krishnan", "Venkatesh", "Naidu", "Kulkarni", "Deshpande",
            "Chowdhury", "Rahman", "Hossain", "Siddiqui", "Qureshi", "Perera", "Fernando",
        ],
        male: &[
            "Aarav", "Arjun", "Vihaan", "Rohan", "Rahul", "Amit", "Sanjay", "Vijay", "Raj", "Anil",
            "Sunil", "Ravi", "Vikram", "Karan", "Aditya", "Nikhil", "Pranav", "Ishaan", "Harish",
            "Deepak", "Suresh", "Ramesh",
        ],
        female: &[
            "Priya", "Ananya", "Aditi", "Diya", "Isha", "Kavya", "Lakshmi", "Meera", "Neha",
            "Pooja", "Riya", "Sanjana", "Shreya", "Sunita", "Anjali", "Deepika", "Divya", "Kavita",
            "Nisha", "Radha", "Saanvi", "Aanya",
        ],
    },
    // Arabic, Persian and Turkish names.
    Origin {
        weight: 2,
        language: ("ar", "Arabic"),
        family: &[
            "Haddad", "Khoury", "Nasser", "Hassan", "Hussein", "Abdullah", "Mansour", "Saleh",
            "Khalil", "Ibrahim", "Yousef", "Farah", "Aziz", "Hamdan", "Darwish", "Sabbagh",
            "Barakat", "Karam", "Najjar", "Al-Masri", "El-Sayed", "Rahimi", "Hosseini", "Karimi",
            "Tehrani", "Yılmaz", "Kaya", "Demir", "Şahin", "Çelik", "Öztürk", "Aydın",
        ],
        male: &[
            "Mohammed", "Ahmed", "Ali", "Omar", "Youssef", "Khalid", "Hamza", "Karim", "Tariq",
            "Samir", "Rami", "Ziad", "Reza", "Dariush", "Mehmet", "Mustafa", "Emre",
        ],
        female: &[
            "Fatima", "Aisha", "Layla", "Mariam", "Noor", "Yasmin", "Zainab", "Hana", "Rania",
            "Leila", "Salma", "Dina", "Shirin", "Parisa", "Elif", "Ayşe", "Zeynep",
        ],
    },
    // West and East African names.
    Origin {
        weight: 2,
        language: ENGLISH,
        family: &[
            "Okafor", "Adeyemi", "Okonkwo", "Nwosu", "Eze", "Oladipo", "Adebayo", "Ogunleye",
            "Abubakar", "Balogun", "Chukwu", "Obi", "Mensah", "Asante", "Boateng", "Owusu", "Osei",
            "Kamara", "Diallo", "Traoré", "Koné", "Mwangi", "Otieno", "Kiptoo", "Tesfaye",
            "Bekele", "Haile",
        ],
        male: &[
            "Chinedu", "Emeka", "Oluwaseun", "Tunde", "Kwame", "Kofi", "Yaw", "Mamadou",
            "Ibrahima", "Abebe", "Tendai", "Obinna", "Femi", "Jelani", "Kwabena",
        ],
        female: &[
            "Chiamaka", "Ngozi", "Adaeze", "Folake", "Abena", "Akosua", "Ama", "Aminata",
            "Fatoumata", "Wanjiru", "Amara", "Nia", "Chidinma", "Funmilayo", "Makeda",
        ],
    },
    // Scandinavian and Finnish names.
    Origin {
        weight: 1,
        language: ENGLISH,
        family: &[
            "Johansson", "Andersson", "Karlsson", "Nilsson", "Eriksson", "Lindqvist",
            "Lindström", "Bergström", "Sjöberg", "Åberg", "Dahl", "Pedersen", "Nielsen",
            "Jørgensen", "Søndergaard", "Halvorsen", "Haugen", "Berg", "Virtanen", "Korhonen",
            "Mäkinen", "Nieminen",
        ],
        male: &[
            "Björn", "Søren", "Lars", "Anders", "Erik", "Nils", "Magnus", "Henrik", "Mikael",
            "Jussi", "Olli", "Åke",
        ],
        female: &[
            "Astrid", "Ingrid", "Sigrid", "Freja", "Maja", "Linnea", "Saga", "Solveig", "Birgitta",
            "Kirsten", "Aino", "Signe",
        ],
    },
    // Greek names.
    Origin {
        weight: 1,
        language: ("el", "Greek"),
        family: &[
            "Papadopoulos", "Papadakis", "Georgiou", "Nikolaidis", "Konstantinou", "Dimitriou",
            "Ioannou", "Christodoulou", "Antoniou", "Vlachos", "Karagiannis", "Economou",
            "Alexiou", "Pappas", "Stavros", "Lambrakis", "Katsaros", "Theodorou",
            "Angelopoulos", "Makris",
        ],
        male: &[
            "Georgios", "Dimitrios", "Konstantinos", "Ioannis", "Nikolaos", "Christos",
            "Panagiotis", "Vasileios", "Athanasios", "Spyros", "Stelios", "Evangelos",
        ],
        female: &[
            "Eleni", "Katerina", "Panagiota", "Sofia", "Despina", "Vasiliki", "Georgia",
            "Dimitra", "Athina", "Eirini", "Paraskevi", "Chrysoula",
        ],
    },
    // Japanese names.
    Origin {
        weight: 1,
        language: ("ja", "Japanese"),
        family: &[
            "Satō", "Suzuki", "Takahashi", "Tanaka", "Watanabe", "Itō", "Yamamoto", "Nakamura",
            "Kobayashi", "Katō", "Yoshida", "Yamada", "Sasaki", "Yamaguchi", "Matsumoto",
            "Inoue", "Kimura", "Hayashi", "Shimizu", "Yamazaki", "Mori", "Abe", "Ikeda",
            "Hashimoto", "Ishikawa",
        ],
        male: &[
            "Hiroshi", "Takeshi", "Kenji", "Haruto", "Yuto", "Sōta", "Ren", "Daiki", "Kaito",
            "Shōta", "Ryō", "Takumi",
        ],
        female: &[
            "Yui", "Aoi", "Sakura", "Hina", "Yuki", "Keiko", "Naoko", "Haruka", "Misaki", "Akiko",
            "Emi", "Kyōko",
        ],
    },
    // Portuguese and Brazilian names.
    Origin {
        weight: 1,
        language: ("pt", "Portuguese"),
        family: &[
            "Silva", "Santos", "Oliveira", "Souza", "Pereira", "Lima", "Carvalho", "Ferreira",
            "Almeida", "Ribeiro", "Gonçalves", "Rodrigues", "Araújo", "Barbosa", "Cardoso",
            "Teixeira", "Correia", "Nascimento", "Magalhães", "Conceição", "Brandão",
            "Figueiredo",
        ],
        male: &[
            "João", "Gonçalo", "Thiago", "Lucas", "Rafael", "Vinícius", "Caio", "Bruno",
            "Márcio", "Leandro", "Fábio", "Sérgio",
        ],
        female: &[
            "Luísa", "Beatriz", "Larissa", "Letícia", "Fernanda", "Juliana", "Luana", "Bárbara",
            "Conceição", "Graça", "Thaís", "Vitória",
        ],
    },
    // Russian names.
    Origin {
        weight: 1,
        language: ("ru", "Russian"),
        family: &[
            "Ivanov", "Smirnov", "Kuznetsov", "Popov", "Vasiliev", "Petrov", "Sokolov",
            "Mikhailov", "Novikov", "Fedorov", "Morozov", "Volkov", "Alekseev", "Lebedev",
            "Semenov", "Egorov", "Pavlov", "Kozlov", "Stepanov", "Nikolaev", "Orlov", "Andreev",
            "Makarov", "Zaitsev", "Solovyov",
        ],
        male: &[
            "Dmitri", "Sergei", "Alexei", "Ivan", "Mikhail", "Vladimir", "Nikolai", "Yuri",
            "Andrei", "Pavel", "Artyom", "Maxim",
        ],
        female: &[
            "Anastasia", "Natalia", "Olga", "Tatiana", "Svetlana", "Irina", "Ekaterina",
            "Yulia", "Ksenia", "Darya", "Polina", "Lyudmila",
        ],
    },
    // Filipino names.
    Origin {
        weight: 2,
        language: ("tl", "Tagalog"),
        family: &[
            "Dimaculangan", "Mangubat", "Sison", "Dela Cruz", "Mangahas", "Evangelista",
            "Aquino", "Pascual", "Manalo", "Dizon", "Macaraeg", "Santiago", "Mercado",
            "Tolentino", "Soriano", "Castañeda", "Magsaysay", "Panganiban", "Buenaventura",
            "Lacson",
        ],
        male: &[
            "Rizaldy", "Rodel", "Jomar", "Ramil", "Arnel", "Rommel", "Ferdinand", "Efren",
            "Jericho", "Marvin",
        ],
        female: &[
            "Maricel", "Rowena", "Jocelyn", "Lorna", "Marites", "Analyn", "Rosalind", "Divina",
            "Maribel", "Liezel",
        ],
    },
];

/// Prefixes for names, by gender and marital status.
pub(crate) const PREFIX_MALE: &str = "Mr.";
pub(crate) const PREFIX_MARRIED: &str = "Mrs.";
pub(crate) const PREFIX_FEMALE: &str = "Ms.";

/// Street names used for addresses.
#[rustfmt::skip]
pub(crate) static STREETS: &[&str] = &[
    "Main", "Oak", "Maple", "Cedar", "Pine", "Elm", "Washington", "Lake", "Hill", "Park",
    "Walnut", "Sunset", "Highland", "Lincoln", "Jefferson", "Church", "Spring", "Ridge",
    "Chestnut", "Willow", "Franklin", "Adams", "River", "Mill", "Forest", "Meadow", "Prospect",
    "Center", "Union", "Madison", "Jackson", "Cherry", "Birch", "Dogwood", "Magnolia",
    "Hickory", "Sycamore", "Laurel", "Aspen", "Juniper", "Valley", "Harbor", "Bay", "Orchard",
    "Summit", "Liberty", "Pleasant", "School", "College", "Broad", "Market", "Water", "Front",
    "Bridge", "Railroad", "Grove", "Cypress", "Palm", "Mesa", "Canyon", "Prairie", "Aurora",
    "Vista", "Heritage", "Kingston", "Windsor", "Bradford", "Fairview", "Glenwood", "Brookside",
    "Riverside", "Lakeview", "Crestwood", "Ashland", "Belmont", "Clifton", "Dover", "Elmwood",
    "Garfield", "Hamilton", "Hawthorne",
];

pub(crate) static STREET_SUFFIXES: &[&str] = &[
    "St", "Ave", "Rd", "Blvd", "Ln", "Dr", "Ct", "Way", "Pl", "Ter", "Cir", "Pkwy",
];

/// A city: name, state, 3-digit ZIP prefix, time zone.
pub(crate) struct City {
    pub name: &'static str,
    pub state: &'static str,
    pub zip3: u16,
    pub tz: Tz,
}

const fn city(name: &'static str, state: &'static str, zip3: u16, tz: Tz) -> City {
    City {
        name,
        state,
        zip3,
        tz,
    }
}

const E: Tz = Tz {
    std_hours: 5,
    dst: true,
};
const C: Tz = Tz {
    std_hours: 6,
    dst: true,
};
const M: Tz = Tz {
    std_hours: 7,
    dst: true,
};
/// Arizona does not observe daylight saving time.
const AZ: Tz = Tz {
    std_hours: 7,
    dst: false,
};
const P: Tz = Tz {
    std_hours: 8,
    dst: true,
};

pub(crate) static CITIES: &[City] = &[
    city("Boston", "MA", 21, E),
    city("Worcester", "MA", 16, E),
    city("Springfield", "MA", 11, E),
    city("Cambridge", "MA", 21, E),
    city("Lowell", "MA", 18, E),
    city("Providence", "RI", 29, E),
    city("Hartford", "CT", 61, E),
    city("New Haven", "CT", 65, E),
    city("Burlington", "VT", 54, E),
    city("Portland", "ME", 41, E),
    city("Manchester", "NH", 31, E),
    city("New York", "NY", 100, E),
    city("Brooklyn", "NY", 112, E),
    city("Buffalo", "NY", 142, E),
    city("Rochester", "NY", 146, E),
    city("Albany", "NY", 122, E),
    city("Newark", "NJ", 71, E),
    city("Trenton", "NJ", 86, E),
    city("Philadelphia", "PA", 191, E),
    city("Pittsburgh", "PA", 152, E),
    city("Baltimore", "MD", 212, E),
    city("Wilmington", "DE", 198, E),
    city("Richmond", "VA", 232, E),
    city("Norfolk", "VA", 235, E),
    city("Charlotte", "NC", 282, E),
    city("Raleigh", "NC", 276, E),
    city("Charleston", "SC", 294, E),
    city("Atlanta", "GA", 303, E),
    city("Savannah", "GA", 314, E),
    city("Miami", "FL", 331, E),
    city("Orlando", "FL", 328, E),
    city("Tampa", "FL", 336, E),
    city("Jacksonville", "FL", 322, E),
    city("Cleveland", "OH", 441, E),
    city("Columbus", "OH", 432, E),
    city("Detroit", "MI", 482, E),
    city("Grand Rapids", "MI", 495, E),
    city("Indianapolis", "IN", 462, E),
    city("Louisville", "KY", 402, E),
    city("Chicago", "IL", 606, C),
    city("Peoria", "IL", 616, C),
    city("Milwaukee", "WI", 532, C),
    city("Madison", "WI", 537, C),
    city("Minneapolis", "MN", 554, C),
    city("Saint Paul", "MN", 551, C),
    city("Des Moines", "IA", 503, C),
    city("Saint Louis", "MO", 631, C),
    city("Kansas City", "MO", 641, C),
    city("Omaha", "NE", 681, C),
    city("Nashville", "TN", 372, C),
    city("Memphis", "TN", 381, C),
    city("Birmingham", "AL", 352, C),
    city("New Orleans", "LA", 701, C),
    city("Houston", "TX", 770, C),
    city("Dallas", "TX", 752, C),
    city("San Antonio", "TX", 782, C),
    city("Austin", "TX", 787, C),
    city("El Paso", "TX", 799, M),
    city("Oklahoma City", "OK", 731, C),
    city("Denver", "CO", 802, M),
    city("Colorado Springs", "CO", 809, M),
    city("Albuquerque", "NM", 871, M),
    city("Phoenix", "AZ", 850, AZ),
    city("Tucson", "AZ", 857, AZ),
    city("Salt Lake City", "UT", 841, M),
    city("Boise", "ID", 837, M),
    city("Las Vegas", "NV", 891, P),
    city("Los Angeles", "CA", 900, P),
    city("San Diego", "CA", 921, P),
    city("San José", "CA", 951, P),
    city("San Francisco", "CA", 941, P),
    city("Sacramento", "CA", 958, P),
    city("Fresno", "CA", 937, P),
    city("Portland", "OR", 972, P),
    city("Eugene", "OR", 974, P),
    city("Seattle", "WA", 981, P),
    city("Spokane", "WA", 992, P),
];
